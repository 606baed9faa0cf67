"""dit_attn.io: files the project writes get the umask's permissions; the size, head and layer parsers."""
import json
import os
import stat

import pytest
import torch
from PIL import Image

import dit_attn as da
from dit_attn.io import (
    SizeError,
    format_size,
    parse_heads,
    parse_layer_groups,
    parse_size,
    read_png_settings,
    save_safetensors_atomic,
    save_torch_atomic,
    write_json_atomic,
    write_png_atomic,
    write_text_atomic,
)


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    """The process umask set for one test and restored after it."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def plain_open_mode(directory, umask) -> int:
    """What a plain open(path, "w") gives under this umask (the reference the atomic writers must match)."""
    path = os.path.join(directory, "plain.txt")
    with open(path, "w") as f:
        f.write("x")
    return mode(path)


def test_atomic_writers_follow_the_umask(tmp_path, umask):
    expected = 0o666 & ~umask
    assert plain_open_mode(tmp_path, umask) == expected
    write_png_atomic(Image.new("RGB", (4, 4), "red"), tmp_path / "a.png", {"seed": 1})
    write_json_atomic(tmp_path / "a.json", {"a": 1})
    write_text_atomic(tmp_path / "a.txt", "text")
    save_safetensors_atomic({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    save_torch_atomic({"step": 3}, tmp_path / "a.pt")
    write_json_atomic(tmp_path / "new" / "sub" / "b.json", [1])  # directories made on the way follow it too
    for name in ("a.png", "a.json", "a.txt", "a.safetensors", "a.pt", "new/sub/b.json"):
        assert mode(tmp_path / name) == expected, (name, oct(mode(tmp_path / name)), oct(expected))
    assert mode(tmp_path / "new") == mode(tmp_path / "new" / "sub") == 0o777 & ~umask
    # the files hold what was written, and no temporary file is left beside them
    assert read_png_settings(tmp_path / "a.png") == {"seed": 1}
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": 1}
    assert torch.load(tmp_path / "a.pt") == {"step": 3}
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_overwrite_takes_the_current_umask(tmp_path, umask):
    """An existing file's mode is not kept: the rewritten file is a new one, as a fresh write would be."""
    path = tmp_path / "a.json"
    path.write_text("{}")
    os.chmod(path, 0o640)
    write_json_atomic(path, {"b": 2})
    assert mode(path) == 0o666 & ~umask


def test_generate_outputs_follow_the_umask(tmp_path, umask):
    from dit_attn.cli import main

    out = tmp_path / "out"
    assert main(["generate", "a red circle", "--steps", "1", "--size", "32", "--out", str(out)]) == 0
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert len(pngs) == 1 and (out / "manifest.jsonl").exists()
    for name in (*pngs, "manifest.jsonl"):
        assert mode(out / name) == 0o666 & ~umask, (name, oct(mode(out / name)))
    assert mode(out) == 0o777 & ~umask


def test_write_atomic_flushes_the_file_then_renames_then_flushes_the_folder(tmp_path, monkeypatch):
    import dit_attn.io as dio

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(dio.os, "fsync", fsync)
    monkeypatch.setattr(dio.os, "replace", replace)
    write_png_atomic(Image.new("RGB", (4, 4)), tmp_path / "a.png", {"seed": 1})
    assert events == ["fsync file", "rename", "fsync folder"]


def test_write_atomic_refuses_a_folder_before_writing(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError, match="a folder is there, give a file name"):
        save_safetensors_atomic({"w": torch.ones(2)}, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"] and not os.listdir(tmp_path / "out")  # no temporary file left


def test_verified_png_settings_trusts_only_whole_pngs(tmp_path):
    from dit_attn.io import verified_png_settings

    path = tmp_path / "a.png"
    write_png_atomic(Image.new("RGB", (16, 16), "red"), path, {"seed": 1})
    assert verified_png_settings(path) == {"seed": 1}
    data = path.read_bytes()
    for label, damaged in (("empty", b""), ("header only", data[:8]), ("truncated", data[:-20]), ("last byte", data[:-1])):
        (tmp_path / "bad.png").write_bytes(damaged)
        with pytest.raises(ValueError, match="is not a whole PNG"):
            verified_png_settings(tmp_path / "bad.png")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the image data: its checksum fails
    (tmp_path / "bad.png").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="is not a whole PNG"):
        verified_png_settings(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="is not a whole PNG"):
        verified_png_settings(tmp_path / "missing.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no 'dit-attn' settings chunk"):
        verified_png_settings(tmp_path / "plain.png")


# ---------------------------------------------------------------------------- parsers


@pytest.mark.parametrize("text, size", [
    ("64", (64, 64)), ("96x64", (64, 96)), ("96X64", (64, 96)), (" 32x48 ", (48, 32)), (128, (128, 128)),
])
def test_parse_size_is_width_by_height_into_height_width(text, size):
    assert parse_size(text) == size
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize("text", ["", "big", "64x", "x64", "-64", "64x32x2", "6.5", "64 x 32", "64*32"])
def test_parse_size_errors(text):
    with pytest.raises(SizeError, match=r"size must be N or WIDTHxHEIGHT \(e.g. 64 or 96x64\)"):
        parse_size(text)
    assert issubclass(SizeError, ValueError)


def test_cli_size_errors_are_usage_errors(tmp_path, capsys):
    from dit_attn.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a red circle", "--size", "64x", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "size must be N or WIDTHxHEIGHT" in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # refused before anything was written


def test_parse_heads():
    assert parse_heads("L1H10,L11H15,sd3:dark") == ["L1H10", "L11H15", "sd3:dark"]
    assert parse_heads(" L1H2 , ,L3,") == ["L1H2", "L3"]
    assert parse_heads("") == [] and parse_heads(" , ") == []
    # parse_heads only splits; a bad name is refused, with the valid forms, when an edit is made of it
    for bad in ("head7", "L1H", "H2"):
        with pytest.raises(ValueError, match=r"cannot read head .*use 'L<layer>H<head>', 'L<layer>'"):
            da.HeadGuidance(heads=parse_heads(f"L0H1,{bad}"))


def test_parse_layer_groups():
    assert parse_layer_groups("3,5+6,10") == [[3], [5, 6], [10]]
    assert parse_layer_groups(" 1 , 2+3 ,") == [[1], [2, 3]]
    for bad in ("two", "1,x", "3+", "+3", "1.5", "5++6"):
        with pytest.raises(ValueError, match=r"cannot read layers .*use indices like '3,5\+6,10'"):
            parse_layer_groups(bad)
    for empty in ("", " , ", ","):
        with pytest.raises(ValueError, match="no layers in"):
            parse_layer_groups(empty)


def test_read_records_reads_each_kind_and_reports_bad_lines(tmp_path):
    from dit_attn.io import read_records

    text = tmp_path / "pairs.tsv"
    text.write_bytes("\ufeffa\tb\n# a comment\n\nno tab here\nc\td\n".encode("utf-8"))
    got = read_records(text, ("prompt", "source_prompt"), text_suffixes=None)
    assert [n for n, _ in got] == [1, 4, 5]
    assert got[0][1] == {"prompt": "a", "source_prompt": "b"} and got[2][1] == {"prompt": "c", "source_prompt": "d"}
    assert isinstance(got[1][1], ValueError) and "prompt<TAB>source_prompt" in str(got[1][1])
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "x"}\n[1]\nnot json\n')
    kinds = [type(r).__name__ for _, r in read_records(jsonl, ("prompt",))]
    assert kinds == ["dict", "ValueError", "ValueError"]
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("prompt,seed\nx,1\n")
    assert read_records(csv_file, ("prompt",)) == [(2, {"prompt": "x", "seed": "1"})]
    with pytest.raises(ValueError, match="'source_prompt' column"):
        read_records(csv_file, ("prompt", "source_prompt"))
    with pytest.raises(ValueError, match="prompt file must be .txt, .jsonl or .csv"):
        read_records(tmp_path / "p.md", ("prompt",), what="prompt file")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_records(tmp_path / "latin.txt", ("prompt",))
