"""ArrowImageDataset: the api.md item contract, memory-mapped reads, disjoint + covering worker
parts, the optional flip, and pickling into DataLoader workers."""
import pickle

import pyarrow as pa
import pytest
import torch

from jetformer.config import REPO_ROOT, load_config
from jetformer.data.dataset import ArrowImageDataset, read_metadata
from jetformer.data.prepare import prepare


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    cfg = load_config(REPO_ROOT / "params.yaml", overrides=(
        f"data.synthetic.out_dir={tmp / 'raw'}", f"data.prepared_dir={tmp / 'prepared'}",
        "data.synthetic.num_train=23", "data.synthetic.num_val=6", "data.synthetic.bad_files=false",
        "data.resolution=16", "data.workers=1", "data.shard_size=5"))
    prepare(cfg)
    return tmp / "prepared"


def test_item_contract(prepared_dir):
    ds = ArrowImageDataset(prepared_dir, "train")
    classes = read_metadata(prepared_dir)["classes"]
    assert len(ds) == 23 and len(ds.paths) == 5
    for i in (0, 7, 22, -1):
        it = ds[i]
        assert set(it) == {"id", "image", "label", "captions", "qa", "attributes"}
        assert it["image"].dtype == torch.uint8 and it["image"].shape == (16, 16, 3)
        assert isinstance(it["id"], str) and len(it["captions"]) == 5
        assert set(it["qa"][0]) == {"question", "answers", "answer_type", "question_type"}
        main = it["attributes"]["objects"][0]
        assert it["label"] == classes.index(main["shape"])
        assert all(f"{main['color']} {main['shape']}" in c for c in it["captions"])
    with pytest.raises(IndexError):
        ds[23]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_worker_parts_disjoint_and_covering(prepared_dir, world_size):
    full = [ArrowImageDataset(prepared_dir, "train")[i]["id"] for i in range(23)]
    parts = [[ds[i]["id"] for i in range(len(ds))]
             for ds in (ArrowImageDataset(prepared_dir, "train", rank=r, world_size=world_size)
                        for r in range(world_size))]
    flat = [x for p in parts for x in p]
    assert len(flat) == len(set(flat)) == 23 and set(flat) == set(full)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank"):
        ArrowImageDataset(prepared_dir, "train", rank=world_size, world_size=world_size)


def test_images_are_memory_mapped_views(prepared_dir):
    before = pa.total_allocated_bytes()
    ds = ArrowImageDataset(prepared_dir, "train")
    views = [ds.image_array(i) for i in range(len(ds))]
    assert pa.total_allocated_bytes() - before < 16 * 16 * 3 * 23         # not copied into RAM
    assert not views[0].flags.writeable and not views[0].flags.owndata
    assert torch.equal(ds.images(), torch.stack([ds[i]["image"] for i in range(len(ds))]))


def test_flip(prepared_dir):
    plain = ArrowImageDataset(prepared_dir, "val")
    flipped = ArrowImageDataset(prepared_dir, "val", flip=True,
                                generator=torch.Generator().manual_seed(0))
    n_flipped = 0
    for _ in range(4):
        for i in range(len(plain)):
            a, b = plain[i]["image"], flipped[i]["image"]
            if torch.equal(b, a.flip(1)) and not torch.equal(a, b):
                n_flipped += 1
            else:
                assert torch.equal(a, b)
    assert 0 < n_flipped < 4 * len(plain)                                # random, about half


def test_pickles_for_dataloader_workers(prepared_dir):
    ds = ArrowImageDataset(prepared_dir, "val", rank=1, world_size=2)
    ds[0]                                                                 # opens the memory maps
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._tables is None and clone[0]["id"] == ds[0]["id"]
    assert torch.equal(clone[0]["image"], ds[0]["image"])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=list)
    assert sum(len(b) for b in loader) == len(ds) == 3


def test_missing_prepared_dir_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro prepare"):
        ArrowImageDataset(tmp_path, "train")


# ----------------------------------------------------------------------------- BatchLoader
def _loader(ds, position=None, workers=0, rank=0, batch=4):
    from jetformer.data.loader import BatchLoader
    return BatchLoader(ds, batch, seed=5, rank=rank, conditioning="class", tokenizer=None,
                       max_text_len=8, position=position, workers=workers, prefetch=2)


def _take(loader, n):
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


def test_batch_loader_batches_do_not_depend_on_worker_processes(prepared_dir):
    ds = ArrowImageDataset(prepared_dir, "train", flip=True, generator=torch.Generator())
    inline = _take(_loader(ds), 8)                                    # 32 items: 2nd epoch
    pooled = _take(_loader(ds, workers=2), 8)
    assert [p for _, p in inline] == [p for _, p in pooled]
    assert inline[-1][1] == {"epoch": 1, "offset": 9}
    for (a, _), (b, _) in zip(inline, pooled):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    # the flips are random per position (some images flipped, not all)
    plain = ArrowImageDataset(prepared_dir, "train").images()
    flat = torch.cat([b["images"] for b, _ in inline[:5]])           # first epoch: 20 items
    as_is = [any(torch.equal(im, p) for p in plain) for im in flat]
    assert 0 < sum(as_is) < len(as_is)


def test_batch_loader_resumes_at_the_exact_position(prepared_dir):
    ds = ArrowImageDataset(prepared_dir, "train", flip=True, generator=torch.Generator())
    full = _take(_loader(ds, workers=2), 9)
    position = full[3][1]                                             # after 4 batches
    resumed = _take(_loader(ds, position=position, workers=2), 5)     # crosses the epoch end
    for (a, pa_), (b, pb) in zip(full[4:], resumed):
        assert pa_ == pb and torch.equal(a["images"], b["images"])
    assert not torch.equal(full[0][0]["images"], resumed[0][0]["images"])


def test_batch_loader_ranks_read_disjoint_parts(prepared_dir):
    parts = [ArrowImageDataset(prepared_dir, "train", rank=r, world_size=2) for r in (0, 1)]
    seen = [torch.cat([b["images"] for b, _ in _take(_loader(ds, rank=r, workers=1), 2)])
            for r, ds in enumerate(parts)]                            # 8 of each part's 11-12
    keys = [{im.numpy().tobytes() for im in s} for s in seen]
    own = [{im.numpy().tobytes() for im in ds.images()} for ds in parts]
    assert len(keys[0]) == len(keys[1]) == 8
    assert keys[0] <= own[0] and keys[1] <= own[1] and not keys[0] & keys[1]


def test_batch_loader_rejects_bad_settings(prepared_dir):
    from jetformer.data.loader import BatchLoader
    ds = ArrowImageDataset(prepared_dir, "val")
    with pytest.raises(ValueError, match="prefetch=0"):
        BatchLoader(ds, 2, seed=0, rank=0, conditioning="class", tokenizer=None,
                    max_text_len=8, prefetch=0)
