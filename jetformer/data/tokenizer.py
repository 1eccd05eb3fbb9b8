"""SentencePiece text tokenizer: ids pad 0, unk 1, bos 2, eos 3 (api.md).

`train_tokenizer` fits a BPE model on the training texts (the `tokenizer` stage; unigram
training stops short of the asked vocabulary on repetitive captions);
`TextTokenizer` loads a `.model` file, trained here or given in `tokenizer.model_path`.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import sentencepiece as spm

from jetformer.safe_io import atomic_write_bytes

if TYPE_CHECKING:      # torch is imported where tensors are made: the `tokenizer` stage needs none
    import torch

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class TextTokenizer:
    """`encode(text) -> ids + [EOS]`, `decode(ids)`, `encode_batch(texts, max_len)`."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} not found: run the `tokenizer` stage "
                                    "(dvc repro tokenizer) or set tokenizer.model_path")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        got = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        if got != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"{path}: special ids (pad, unk, bos, eos) = {got}, expected "
                             f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; retrain with train_tokenizer()")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, eos: bool = True) -> list[int]:
        """Token ids of `text`, followed by EOS unless `eos=False`."""
        return self.sp.encode(text) + ([EOS_ID] if eos else [])

    def decode(self, ids) -> str:
        """Text of `ids` up to the first EOS; pad/bos are dropped."""
        if hasattr(ids, "tolist"):                 # a tensor or an array
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                out.append(int(i))
        return self.sp.decode(out)

    def encode_batch(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens long [B, max_len], mask bool [B, max_len]); each row ends with EOS (texts
        longer than max_len - 1 tokens are truncated), then pad 0."""
        import torch
        tokens = torch.full((len(texts), max_len), PAD_ID, dtype=torch.long)
        for b, text in enumerate(texts):
            ids = self.encode(text, eos=False)[: max_len - 1] + [EOS_ID]
            tokens[b, : len(ids)] = torch.tensor(ids)
        return tokens, tokens != PAD_ID


def training_texts(prepared_dir: str | Path) -> list[str]:
    """Every caption, question and distinct answer of the prepared train split, plus the class
    names (so class-only sources such as ImageNet still give a vocabulary)."""
    import pyarrow as pa

    from jetformer.data.dataset import read_metadata
    meta = read_metadata(prepared_dir)
    texts = [c.replace("_", " ") for c in meta["classes"]]
    for shard in meta["shards"]["train"]:
        table = pa.ipc.open_file(
            pa.memory_map(str(Path(prepared_dir) / "train" / shard))).read_all()
        for caps in table.column("captions").to_pylist():
            texts.extend(caps or [])
        for qas in table.column("qa").to_pylist():
            for qa in qas or []:
                texts.append(qa["question"])
                texts.extend(sorted(set(qa["answers"])))
    return texts


def train_tokenizer(texts: Iterable[str], out_path: str | Path, vocab_size: int) -> TextTokenizer:
    """Fit a BPE SentencePiece model on `texts` and write it atomically to `out_path`.

    The vocabulary may come out smaller than `vocab_size` when the texts are too few to fill
    it (`hard_vocab_limit=False`); `TextTokenizer.vocab_size` tells the real size."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no training text for the tokenizer (captions/questions/answers/classes)")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, hard_vocab_limit=False,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    out_path = Path(out_path)
    atomic_write_bytes(out_path, model.getvalue())
    return TextTokenizer(out_path)


def tokenizer_path(cfg, checkpoint: str | Path) -> Path:
    """The sentencepiece model the checkpoint was trained with: `tokenizer.model_path` or
    `tokenizer.out_path`, relative to the working directory, the checkpoint's project, or
    this repository."""
    from jetformer.config import REPO_ROOT
    from jetformer.train.tracking import project_root

    rel = Path(cfg.tokenizer.model_path or cfg.tokenizer.out_path)
    ck = Path(checkpoint).resolve()
    for base in (Path.cwd(), project_root(ck if ck.is_dir() else ck.parent), REPO_ROOT):
        cand = rel if rel.is_absolute() else base / rel
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"tokenizer {rel} of checkpoint {checkpoint} not found "
                            "(run `dvc repro tokenizer`)")
