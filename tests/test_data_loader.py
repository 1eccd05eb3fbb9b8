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
    flipped = ArrowImageDataset(prepared_dir, "val", flip=True, generator=torch.Generator().manual_seed(0))
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
