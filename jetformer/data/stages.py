"""The data DVC stages, one function each (`pipelines/{prepare,tokenizer,fit_pca}.py` only wire
them to the command line through `jetformer.stage.run_stage`)."""
from __future__ import annotations

import shutil
from pathlib import Path

from jetformer.config import Config
from jetformer.safe_io import atomic_write_bytes
from jetformer.stage import write_metrics


def _unavailable_reason(cfg: Config, role: str) -> str:
    d = cfg.data
    key = f"data.roles.{role}.source"
    if getattr(d.roles, role).source == "none":
        return f"{key} is 'none'"
    need = {"caption": "a captioned source (data.coco)", "vqa": "VQAv2 (data.vqav2)",
            "zeroshot": "an ImageFolder with class names (data.imagefolder incl. class_names)"}
    return (f"{key} is 'auto' and neither the pretraining source '{d.source}' nor the paths "
            f"configured provide {need[role]}")


def _class_dirs(cfg: Config) -> list[str]:
    """ImageFolder class directories (sorted, as `readers.read_imagefolder` labels them)."""
    root = Path(cfg.data.imagefolder.train_images)
    if not root.is_dir():
        raise FileNotFoundError(f"data.imagefolder.train_images = '{root}': directory not found")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_names(cfg: Config, source: str, classes: list[str]) -> list[str] | None:
    """Human-readable class names from `data.imagefolder.class_names`; None = the class
    directories are the names (the shapes world: `circle`, ...)."""
    from jetformer.data.classnames import read_class_names

    if source == "imagefolder" and cfg.data.imagefolder.class_names:
        return read_class_names(cfg.data.imagefolder.class_names, classes)
    return None



def run_prepare(cfg: Config, role: str = "pretrain",
                metrics: str | Path = "metrics/prepare/{role}.json") -> dict:
    """`prepare@<role>`: (generate the shapes world, then) read the role's source into its
    prepared directory with a `role.json` (jetformer.data.roles). A role fed by the
    pretraining source only points there; a role without a source records why. Writes and
    returns the role's prepare metrics."""
    from jetformer.config import SOURCE_PROVIDES, role_config, role_prepared_dir, role_source
    from jetformer.data.prepare import prepare, prepare_metrics
    from jetformer.data.roles import write_role

    source, out = role_source(cfg.data, role), Path(role_prepared_dir(cfg.data, role))
    metrics = Path(str(metrics).format(role=role))
    info = {"role": role, "source": source, "data": ".", "unavailable": "",
            "provides": list(SOURCE_PROVIDES.get(source, ())), "class_names": None}
    if source == "none" or (role != "pretrain" and source == cfg.data.source):
        if out.exists():                      # what an earlier run of this stage left
            shutil.rmtree(out)
        if source == "none":
            info.update(data=None, provides=[], unavailable=_unavailable_reason(cfg, role))
            print(f"prepare@{role}: unavailable ({info['unavailable']})")
        else:
            info["data"] = cfg.data.prepared_dir
            classes = _class_dirs(cfg) if source == "imagefolder" else []
            info["class_names"] = _class_names(cfg, source, classes)
            print(f"prepare@{role}: the pretraining data ({cfg.data.prepared_dir}, '{source}')")
        write_role(out, info)
        write_metrics(metrics, {k: info[k] for k in ("role", "source", "data", "unavailable")})
        return info

    report = prepare(role_config(cfg, role), on_shard_done=lambda o: print(
        f"  shard {o['file']}: {o['written']} images, {len(o['skipped'])} skipped", flush=True))
    info["class_names"] = _class_names(cfg, source, report["classes"])
    write_role(out, info)
    out_metrics = {"role": role, "source": source, **prepare_metrics(report)}
    write_metrics(metrics, out_metrics)      # flat: the per-file lists stay in the report
    for split, s in report["splits"].items():
        print(f"{split}: {s['written']} written, {s['skipped']} skipped, "
              f"{s['converted']} converted")
        for x in s["skipped_files"]:
            print(f"  skipped {x['file']}: {x['reason']}")
    print(f"{out_metrics['images_per_s']:.0f} images/s; prepare@{role} ({source}) -> {out} ready")
    return out_metrics


def run_tokenizer(cfg: Config) -> Path:
    """Train SentencePiece on the prepared training texts, or install `tokenizer.model_path`;
    returns `tokenizer.out_path`."""
    from jetformer.data.tokenizer import TextTokenizer, train_tokenizer, training_texts

    t = cfg.tokenizer
    out = Path(t.out_path)
    if t.model_path:
        tok = TextTokenizer(t.model_path)          # checks the special ids
        atomic_write_bytes(out, Path(t.model_path).read_bytes())
        print(f"tokenizer: using {t.model_path} (vocab {tok.vocab_size}) -> {out}")
    else:
        texts = training_texts(cfg.data.prepared_dir)
        tok = train_tokenizer(texts, out, t.vocab_size)
        print(f"tokenizer: trained on {len(texts)} texts, vocab {tok.vocab_size} -> {out}")
    return out


def fit_train_pca(cfg: Config) -> tuple[dict, int]:
    """(PCA of patches of the first `pca.num_images` training images, number of images used)."""
    from jetformer.data.dataset import ArrowImageDataset
    from jetformer.data.pca import fit_pca

    ds = ArrowImageDataset(cfg.data.prepared_dir, "train")
    n = min(cfg.pca.num_images, len(ds))
    images = ds.images(range(n)).numpy()                          # [N, H, W, 3] uint8
    return fit_pca(images, cfg.model.patch_size), n


def run_fit_pca(cfg: Config) -> Path | None:
    """When `pca.enabled`, fit PCA on training patches and save it to `pca.out_path` (returned);
    otherwise leave a DISABLED.txt note in its directory (returns None)."""
    out = Path(cfg.pca.out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    note_path = out.parent / "DISABLED.txt"
    for stale in (out, note_path):            # what an earlier run of this stage left
        stale.unlink(missing_ok=True)
    if not cfg.pca.enabled:
        note = "pca.enabled is false: no PCA fitted (set it true for model.factoring=pca)\n"
        note_path.write_text(note)
        print("fit_pca: " + note.strip())
        return None
    from jetformer.data.pca import save_pca
    pca, n = fit_train_pca(cfg)
    save_pca(pca, out)
    ev = pca["explained_variance"].numpy()
    keep = cfg.model.factored_dims
    print(f"fit_pca: {n} images, {n * cfg.num_image_tokens} patches; the first "
          f"{keep} of {len(ev)} components explain {ev[:keep].sum() / ev.sum():.1%} of the "
          f"variance -> {out}")
    return out
