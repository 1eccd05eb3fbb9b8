"""Random bytes everywhere a user hands the repo a file: image decoding (`load_image`), the
COCO / VQAv2 annotation readers and the CLI's image arguments. Every input ends in a decoded
image, a skip with a one-line reason (BadFile / SourceError), or a one-line `error:` with exit
status 1, never another exception."""
import io
import json

import pytest
import torch
from conftest import make_tiny_cfg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from jetformer.cli import main
from jetformer.data import readers
from jetformer.data.readers import BadFile, SourceError, load_image

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb", b"GIF89a",
         b"GIF87a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"P6\n",
         b"P5\n3 3\n255\n", b"\x00\x00\x01\x00", b"8BPS", b"\x00\x00\x00\x0cjP  "]


def _valid(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (20, 18), 90).save(buf, format=fmt)
    return buf.getvalue()


VALID = [_valid("PNG"), _valid("JPEG"), _valid("BMP"), _valid("TIFF"), _valid("GIF", "P"),
         _valid("WEBP"), _valid("PNG", "RGBA")]

random_files = st.one_of(
    st.tuples(st.sampled_from(MAGIC), st.binary(max_size=2048)).map(lambda t: t[0] + t[1]),
    st.tuples(st.sampled_from(VALID), st.integers(0, 10_000)).map(lambda t: t[0][: t[1]]),
    st.tuples(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10_000),
                                                          st.integers(0, 255)), max_size=8))
    .map(lambda t: _flip(*t)))


def _flip(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    return bytes(b)


def _assert_one_line(text: str) -> None:
    assert text.strip() and "\n" not in text.strip(), repr(text)


@FUZZ
@given(data=random_files, ext=st.sampled_from([".png", ".jpg", ".bmp", ".tif", ".webp", ".gif"]))
def test_random_bytes_to_load_image_decode_or_skip_with_reason(tmp_path_factory, data, ext):
    path = tmp_path_factory.mktemp("img") / f"x{ext}"
    path.write_bytes(data)
    try:
        pixels, notes = load_image(path, 8, min_side=1)
    except BadFile as e:
        _assert_one_line(str(e))
    else:
        assert pixels.shape == (8, 8, 3) and pixels.dtype.name == "uint8"
        assert all(isinstance(n, str) for n in notes)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(
                                ["images", "annotations", "questions", "id", "image_id",
                                 "file_name", "caption", "question_id", "question", "answers",
                                 "answer", "x"]), inner, max_size=5)),
    max_leaves=20)


def _write(path, value):
    if isinstance(value, bytes):
        path.write_bytes(value)
    else:
        path.write_text(json.dumps(value))
    return path


@FUZZ
@given(ann=st.one_of(json_values, st.binary(max_size=300)))
def test_random_coco_annotations_are_a_source_error(tmp_path_factory, ann):
    d = tmp_path_factory.mktemp("coco")
    (d / "im").mkdir()
    Image.new("RGB", (20, 20)).save(d / "im" / "a.jpg")
    try:
        records = readers.read_coco_captions(_write(d / "a.json", ann), d / "im", "data.x",
                                             stats={})
    except SourceError as e:
        _assert_one_line(str(e))
        assert "data.x" in str(e)
    else:
        assert all(isinstance(r.id, str) and isinstance(r.path, str) for r in records)


@FUZZ
@given(q=st.one_of(json_values, st.binary(max_size=200)),
       a=st.one_of(json_values, st.binary(max_size=200)))
def test_random_vqa_files_are_a_source_error(tmp_path_factory, q, a):
    d = tmp_path_factory.mktemp("vqa")
    (d / "im").mkdir()
    Image.new("RGB", (20, 20)).save(d / "im" / "COCO_1.jpg")
    try:
        records = readers.read_vqav2(_write(d / "q.json", q), _write(d / "a.json", a), d / "im",
                                     ("data.q", "data.a", "data.i"), stats={})
    except SourceError as e:
        _assert_one_line(str(e))
        assert "data.q" in str(e) or "data.a" in str(e)
    else:
        assert all(isinstance(r.qa, list) for r in records)


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    from jetformer.data.tokenizer import train_tokenizer
    from jetformer.models.jetformer import JetFormer
    from jetformer.train.checkpoint import export_model
    d = tmp_path_factory.mktemp("ck")
    tok = train_tokenizer(["a red circle", "a blue square", "what color?", "red", "blue"] * 6,
                          d / "tok.model", vocab_size=40)
    cfg = make_tiny_cfg(f"tokenizer.out_path={d / 'tok.model'}")
    torch.manual_seed(0)
    model = JetFormer.from_config(cfg, vocab_size=tok.vocab_size)
    export_model({"config": cfg.to_dict(), "vocab_size": tok.vocab_size, "num_classes": 0,
                  "pca": None, "step": 1, "model": model.state_dict(), "ema": None}, d / "ck")
    return str(d / "ck")


CLI = settings(max_examples=40, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@CLI
@given(data=random_files, command=st.sampled_from(["caption", "nll", "answer"]))
def test_random_bytes_as_cli_image_argument(text_checkpoint, tmp_path_factory, capsys, data,
                                            command):
    path = tmp_path_factory.mktemp("cli") / "input.png"
    path.write_bytes(data)
    argv = [command, "--checkpoint", text_checkpoint, str(path)]
    if command == "answer":
        argv.append("what color?")
    code = main(argv)
    out = capsys.readouterr()
    if code == 0:                                 # the bytes happened to be a decodable image
        assert out.out.startswith(str(path)) or command == "answer"
    else:
        assert code == 1
        assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
        assert str(path) in out.err
