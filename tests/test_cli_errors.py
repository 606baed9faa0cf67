"""Every bad input to the command line is one line on stderr and a non-zero exit, found before a model
loads; --debug shows the traceback; the Python APIs refuse bad sizes and steps before they allocate."""
import errno
import json
import math
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import dit_attn as da
from dit_attn.cli import main
from dit_attn.cli.localization import read_pairs
from dit_attn.workflows.batch import read_prompts

HUGE = "100000x100000"
UNWRITABLE = "/proc/dit-attn-test/out"  # /proc takes no new folders, not even from root


@pytest.fixture()
def files(tmp_path):
    """Paths the table's commands are given: a plain file, a folder, a missing file, a text file named .png,
    LoRA files of rank 0, and a prompt file."""
    paths = {"file": tmp_path / "a-file", "dir": tmp_path / "a-folder", "missing": tmp_path / "missing.txt",
             "notimage": tmp_path / "notes.png", "rank0": tmp_path / "rank0.safetensors",
             "junk": tmp_path / "junk.safetensors", "prompts": tmp_path / "p.txt", "lora_rank0": tmp_path / "lora0.safetensors",
             "work": tmp_path / "work", "out": tmp_path / "out"}
    paths["file"].write_text("x")
    paths["dir"].mkdir()
    paths["notimage"].write_text("these are notes, not a picture")
    name = "transformer_blocks.0.attn.to_q"
    save_file({f"{name}.lora_A.weight": torch.zeros(0, 192), f"{name}.lora_B.weight": torch.zeros(192, 0)}, paths["rank0"],
              metadata={"lora_rank": "0", "lora_alpha": "1"})
    save_file({f"transformer.{name}.lora_A.weight": torch.zeros(0, 192), f"transformer.{name}.lora_B.weight": torch.zeros(192, 0)},
              paths["lora_rank0"])
    paths["junk"].write_bytes(b"not a safetensors file")
    paths["prompts"].write_text("a red circle\n")
    return {k: str(v) for k, v in paths.items()}


# (argv with {placeholders} from `files`, a fragment of the one error line)
CASES = [
    # generate
    (["generate", "a", "--out", "{file}"], "is a file; give a folder"),
    (["generate", "a", "--out", UNWRITABLE], "cannot make the folder"),
    (["generate", "--prompts", "{missing}", "--out", "{out}"], "--prompts '{missing}': no such file"),
    (["generate", "--prompts", "{dir}", "--out", "{out}"], "is a folder; give a file"),
    (["generate", "a", "--device", "cuda:99", "--out", "{out}"], "--device: device 'cuda:99'"),
    (["generate", "a", "--device", "gpu", "--out", "{out}"], "not a device name"),
    (["generate", "a", "--size", HUGE, "--out", "{out}"], "more than this machine's budget"),
    (["generate", "a", "--steps", "0", "--out", "{out}"], "--num-inference-steps must be in [1, 1000], got 0"),
    (["generate", "a", "--size", "0", "--out", "{out}"], "height must be >= 1, got 0"),
    (["generate", "", "--out", "{out}"], "the prompt is empty"),
    (["generate", "a", "  ", "--out", "{out}"], "prompt 2 is empty"),
    (["generate", "a", "--guidance-scale", "nan", "--out", "{out}"], "must be a finite number, got 'nan'"),
    (["generate", "a", "--guidance-scale", "150", "--out", "{out}"], "--guidance-scale must be in [0.0, 100.0], got 150"),
    (["generate", "a", "--pag-scale", "inf", "--out", "{out}"], "must be a finite number, got 'inf'"),
    (["generate", "a", "--u=-inf", "--out", "{out}"], "must be a finite number"),
    (["generate", "a", "--seed", "-1", "--out", "{out}"], "--seed must be in [0, "),
    (["generate", "a", "--max-sequence-length", "0", "--out", "{out}"], "--max-sequence-length must be >= 1"),
    (["generate", "a", "--batch-size", "0", "--out", "{out}"], "--batch-size must be >= 1"),
    (["generate", "a", "--local-radius", "2", "--local-weights", "{rank0}", "--out", "{out}"], "lora_rank metadata must be"),
    (["generate", "a", "--local-radius", "2", "--local-weights", "{junk}", "--out", "{out}"], "not a readable safetensors"),
    (["generate", "a", "--local-radius", "2", "--local-weights", "{missing}", "--out", "{out}"], "no such file"),
    (["generate", "a", "--steps", "x"], "invalid int value: 'x'"),
    (["generate", "a", "--frames", "0", "--out", "{out}"], "--num-frames must be in [1, 1001], got 0"),
    (["generate", "a", "--fps", "0", "--out", "{out}"], "--fps must be > 0 and <= 240.0, got 0.0"),
    (["generate", "a", "--fps", "nan", "--out", "{out}"], "must be a finite number, got 'nan'"),
    (["generate", "a", "--frames", "5", "--out", "{out}"], "num_frames is for video models; 'tiny' makes images"),
    (["generate", "a", "--video-format", "webp", "--out", "{out}"], "video_format is for video models; 'tiny' makes images"),
    (["generate", "a", "--video-format", "avi", "--out", "{out}"], "invalid choice: 'avi'"),
    (["generate", "a", "--local-radius", "1,2", "--out", "{out}"], "must be one number or 3 (FRAMES,HEIGHT,WIDTH)"),
    (["generate", "a", "--local-radius", "1,2,2", "--out", "{out}"], "'tiny' makes images: its local radius is one number"),
    (["generate", "a", "--model", "{dir}", "--out", "{out}"], "cannot read the pipeline '{dir}'"),
    # heads
    (["heads", "--device", "cuda:99"], "--device: device 'cuda:99'"),
    # hunt / atlas
    (["hunt", "--objective", "judge", "--prompts", "{missing}"], "--prompts '{missing}': no such file"),
    (["hunt", "--objective", "judge", "--prompts", "{prompts}", "--steps", "0"], "must be in [1, 1000]"),
    (["hunt", "--objective", "judge", "--prompts", "{prompts}", "--out", "{dir}"], "is a folder; give a file name"),
    (["hunt", "--objective", "judge", "--prompts", "{prompts}", "--seeds", "0", "-2"], "--seeds must be in [0, "),
    (["hunt", "--objective", "judge", "--prompts", "{prompts}", "--k", "0"], "--k must be >= 1"),
    (["hunt", "--objective", "judge", "--prompts", "{prompts}", "--guidance-scale", "inf"], "must be a finite number"),
    (["atlas", "--objective", "judge", "--prompts", "{prompts}", "--size", HUGE], "more than this machine's budget"),
    (["atlas", "--objective", "judge", "--prompts", "{prompts}", "--out", UNWRITABLE + "/atlas"], "cannot make the folder"),
    # app: the device is checked before a server starts
    (["app", "--device", "cuda:99"], "--device: device 'cuda:99'"),
    # localize / edit-text
    (["localize", "--pairs", "{missing}"], "--pairs '{missing}': no such file"),
    (["localize", "--signs", "1", "--seeds", "-1"], "--seeds must be in [0, "),
    (["localize", "--signs", "1", "--out", "{file}"], "is a file; give a folder"),
    (["localize", "--signs", "1", "--out", UNWRITABLE], "cannot make the folder"),
    (["localize", "--signs", "1", "--start", "2"], "--start must be in [0, 1]"),
    (["localize", "--signs", "1", "--size", HUGE], "more than this machine's budget"),
    (["edit-text", "", "--text", "B", "--layers", "1"], "the prompt is empty"),
    (["edit-text", 'a sign that says "A"', "--text", " ", "--layers", "1"], "--text is empty"),
    (["edit-text", 'a sign that says "A"', "--text", "B", "--layers", "1", "--steps", "0"], "must be in [1, 1000]"),
    (["edit-text", 'a sign that says "A"', "--text", "B", "--layers", "1", "--out", UNWRITABLE], "cannot make the folder"),
    # ic
    (["ic", "a", "--reference", "0={notimage}", "--out", "{out}"], "--reference 0={notimage}: not an image"),
    (["ic", "a", "--reference", "0={missing}", "--out", "{out}"], "--reference '{missing}': no such file"),
    (["ic", "a", "--size", HUGE, "--out", "{out}"], "more than this machine's budget"),
    (["ic", "a", "--steps", "0", "--out", "{out}"], "--steps must be in [1, 1000], got 0"),
    (["ic", "a", "--cfg", "nan", "--out", "{out}"], "must be a finite number"),
    (["ic", "", "--panel", "b"], "the caption is empty"),
    (["ic", "a", "--panel", "b"], "not both"),
    (["ic", "a", "--lora", "{lora_rank0}", "--out", "{out}"], "has rank 0"),
    (["ic", "a", "--lora", "{junk}", "--out", "{out}"], "not a readable safetensors"),
    (["ic", "a", "--out", "{file}"], "is a file; give a folder"),
    (["ic", "a", "--out", UNWRITABLE], "cannot make the folder"),
    # trainers
    (["train-tiny", "--work", "{work}", "--out", "{out}", "--images", "0"], "--images must be >= 1, got 0"),
    (["train-tiny", "--work", "{work}", "--out", "{file}"], "is a file; give a folder"),
    (["train-tiny", "--work", UNWRITABLE, "--out", "{out}"], "cannot make the folder"),
    (["train-tiny", "--work", "{work}", "--out", "{out}", "--lr", "nan"], "must be a finite number"),
    (["distill-clear", "--work", "{work}", "--out", "{dir}", "--radius", "2"], "is a folder; give a file name"),
    (["distill-clear", "--work", "{work}", "--out", "{out}.safetensors", "--radius", "2", "--prompts", "{missing}"],
     "no such file"),
    (["distill-clear", "--work", "{work}", "--out", "{out}.safetensors", "--radius", "2", "--size", "100000"],
     "more than this machine's budget"),
    (["distill-clear", "--work", "{work}", "--out", "{out}.safetensors", "--radius", "2", "--lr", "inf"], "must be a finite number"),
    (["distill-clear", "--work", "{work}", "--out", "{out}.safetensors", "--radius", "2", "--lora-rank", "0"], "lora_rank must be"),
    (["train-lora", "--layers", "1", "--data", "{missing}", "--work", "{work}", "--out", "{out}"], "data directory not found"),
    (["train-lora", "--layers", "1", "--data", "{dir}", "--work", "{work}", "--out", "{file}"], "is a file; give a folder"),
    (["train-lora", "--layers", "1", "--data", "{dir}", "--work", "{work}", "--out", "{out}", "--lr", "nan"], "must be a finite number"),
    (["train-lora", "--layers", "1", "--data", "{dir}", "--work", "{work}", "--out", "{out}", "--rank", "0"], "rank must be"),
    (["maps", "a red circle", "--steps", "0", "--out", "{out}"], "must be in [1, 1000]"),
    (["maps", "a red circle", "--size", HUGE, "--out", "{out}"], "more than this machine's budget"),
    (["maps", "a red circle", "--out", "{file}"], "is a file; give a folder"),
    (["hunt", "--objective", "judge", "--prompts", "{prompts}", "--strategy", "screen+race"], "is not differentiable"),
]

EVERY_COMMAND = {"generate", "heads", "hunt", "atlas", "app", "localize", "edit-text", "ic", "train-tiny", "distill-clear",
                 "train-lora", "maps"}


def test_the_table_covers_every_subcommand():
    from dit_attn.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert commands == EVERY_COMMAND and {argv[0] for argv, _ in CASES} == commands


def run_cli(argv) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    return code


@pytest.mark.parametrize("argv, fragment", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_before_a_model_loads(argv, fragment, files, monkeypatch, capsys):
    import dit_attn.loading

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(dit_attn.loading, "load_pipeline", no_model)
    argv = [a.format(**files) for a in argv]
    code = run_cli(argv)
    err = capsys.readouterr().err
    assert code not in (0, None), err
    assert "Traceback" not in err and err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"dit-attn {argv[0]}: error: "), err
    assert fragment.format(**files) in err, err
    assert UNWRITABLE not in err or not os.path.exists(UNWRITABLE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA build with a GPU runs --device cuda")
def test_cuda_on_a_cpu_machine(capsys):
    assert main(["generate", "a", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device 'cuda'" in err and ("no CUDA support" in err or "no CUDA device" in err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in any folder")
def test_unwritable_output_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert main(["generate", "a", "--out", str(locked)]) == 2
        assert "cannot write in the folder" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("error, fragment, code", [
    (AssertionError("Torch not compiled with CUDA enabled"), "no CUDA support; install a CUDA build of torch", 1),
    (PermissionError(errno.EACCES, "Permission denied", "/models/x"), "Permission denied: '/models/x'", 1),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
     "CUDA error: out of memory CUDA kernel", 1),
    (MemoryError(), "out of memory", 1),
    (ZeroDivisionError("division by zero"), "ZeroDivisionError: division by zero (an internal error: rerun with --debug", 1),
    (ValueError("bad"), "error: bad", 2),
])
def test_failures_while_running_are_one_line_and_debug_shows_the_traceback(error, fragment, code, monkeypatch, capsys):
    import dit_attn.loading

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(dit_attn.loading, "load_pipeline", failing)
    assert main(["heads"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and fragment in err, err
    with pytest.raises(type(error)):
        main(["--debug", "heads"])


def test_debug_reraises_input_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        main(["--debug", "generate", "--prompts", str(tmp_path / "missing.txt")])


# --- findings that need the model loaded ------------------------------------------------------------------------------


def lora_file(path, a_shape, b_shape, prefix="", rank="2"):
    name = f"{prefix}transformer_blocks.0.attn.to_q"
    save_file({f"{name}.lora_A.weight": torch.zeros(*a_shape), f"{name}.lora_B.weight": torch.zeros(*b_shape)}, path,
              metadata={"lora_rank": rank, "lora_alpha": "2"})
    return str(path)


def last_line_is_the_error(err: str, command: str, fragment: str) -> None:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in err and sum("error:" in line for line in lines) == 1, err
    assert lines[-1].startswith(f"dit-attn {command}: error: ") and fragment in lines[-1], err


def test_local_weights_of_another_model_are_refused_in_one_line(tmp_path, capsys):
    wrong = lora_file(tmp_path / "wrong.safetensors", (2, 100), (100, 2))  # the tiny model's to_q is 192 x 192
    assert main(["generate", "a", "--local-radius", "2", "--local-weights", wrong, "--steps", "1", "--size", "32",
                 "--out", str(tmp_path / "o")]) == 2
    last_line_is_the_error(capsys.readouterr().err, "generate", "makes a 100x100 update, the model's weight is (192, 192)")
    mismatched = lora_file(tmp_path / "mismatched.safetensors", (2, 192), (192, 3))
    assert main(["generate", "a", "--local-radius", "2", "--local-weights", mismatched, "--out", str(tmp_path / "o")]) == 2
    last_line_is_the_error(capsys.readouterr().err, "generate", "mismatched shapes")


def test_local_weights_of_rank_0_or_bad_shapes_fail_in_apply(sd3_pipe, tmp_path):
    name = "transformer_blocks.0.attn.to_q"
    width = sd3_pipe.transformer.get_parameter(name + ".weight").shape[1]
    original = sd3_pipe.transformer.get_parameter(name + ".weight").detach().clone()
    cases = {"rank0": ((0, width), (width, 0), "0", "lora_rank metadata must be a whole number >= 1"),
             "split": ((2, width), (width, 3), "2", "mismatched shapes"),
             "other": ((2, width + 1), (width, 2), "2", "update, the model's weight is"),
             "meta": ((2, width), (width, 2), "3", "its lora_rank metadata says 3")}
    for label, (a, b, rank, message) in cases.items():
        path = lora_file(tmp_path / f"{label}.safetensors", a, b, rank=rank)
        with pytest.raises(ValueError, match=message):
            da.apply(sd3_pipe, da.LocalAttention(2, weights=path))
        assert torch.equal(sd3_pipe.transformer.get_parameter(name + ".weight"), original)  # left unchanged


def test_ic_lora_with_shapes_of_another_model_is_one_line(tmp_path, capsys):
    wrong = lora_file(tmp_path / "lora.safetensors", (2, 100), (100, 2), prefix="transformer.")
    assert main(["ic", "a", "--lora", wrong, "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    last_line_is_the_error(capsys.readouterr().err, "ic", "(a LoRA for another model?)")
    assert not (tmp_path / "o" / "canvas.png").exists()


# --- the trainers' --out and --images, at the API ----------------------------------------------------------------------


def test_train_tiny_refuses_zero_images_before_rendering(tmp_path):
    from dit_attn.train.config import TrainConfig
    from dit_attn.train.tiny import train_tiny

    with pytest.raises(ValueError, match="images must be >= 1, got 0"):
        train_tiny(TrainConfig(images=0), str(tmp_path / "work"), str(tmp_path / "out"))
    assert not (tmp_path / "work").exists()


def test_distill_clear_refuses_a_folder_as_out_before_training(sd3_pipe, tmp_path):
    from dit_attn.train.config import DistillConfig
    from dit_attn.train.distill_clear import distill

    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="is a folder; give the .safetensors file"):
        distill(sd3_pipe, DistillConfig(radius=2), str(tmp_path / "work"), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no work started, no stray temporary file
    assert not list((tmp_path / "out").iterdir())


# --- the Python APIs refuse bad sizes and steps before they allocate ---------------------------------------------------


def test_apis_refuse_huge_sizes_and_bad_steps_before_allocating(sd3_pipe, monkeypatch):
    from dit_attn.guidance.search import search_settings
    from dit_attn.workflows.highres import generate_highres

    def no_call(*args, **kwargs):
        raise AssertionError("the pipeline was called")

    monkeypatch.setattr(type(sd3_pipe), "__call__", no_call)
    huge = dict(height=100_000, width=100_000)
    size_error = r"more than this (model's largest side|machine's budget)"
    with pytest.raises(ValueError, match=size_error):
        da.ic.generate_set(sd3_pipe, "x", "1x2", size=(100_000, 100_000))
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\]"):
        da.ic.generate_set(sd3_pipe, "x", "1x2", size=(32, 64), num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        da.ic.generate_set(sd3_pipe, "x", "1x2", size=(32, 64), guidance_scale=math.nan)
    with pytest.raises(ValueError, match=size_error):
        da.localize(sd3_pipe, [('a "A"', 'a "B"')], **huge)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        da.localize(sd3_pipe, [('a "A"', 'a "B"')], guidance_scale=math.inf)
    with pytest.raises(ValueError, match=size_error):
        da.edit_text(sd3_pipe, 'a sign that says "A"', "B", layers=[0], **huge)
    with pytest.raises(ValueError, match=r"in \[1, 1000\]"):
        da.edit_text(sd3_pipe, 'a sign that says "A"', "B", layers=[0], num_inference_steps=5000)
    with pytest.raises(ValueError, match=size_error):
        generate_highres(sd3_pipe, "x", 100_000, 100_000, radius=4)
    with pytest.raises(ValueError, match=r"in \[1, 1000\]"):
        generate_highres(sd3_pipe, "x", 64, 64, radius=4, base_height=32, base_width=32, num_inference_steps=0)
    with pytest.raises(ValueError, match="machine's budget"):
        search_settings("judge", ["x"], [0], 1, 1, 1.0, 3.0, 2, None, 100_000, 100_000, [(0, 0)], "identity", "joint", 1, None)
    with pytest.raises(ValueError, match=r"in \[1, 1000\]"):
        search_settings("judge", ["x"], [0], 1, 1, 1.0, 3.0, 5000, None, None, None, [(0, 0)], "identity", "joint", 1, None)
    with pytest.raises(ValueError, match=size_error):
        da.hunt(sd3_pipe, "judge", ["x"], [0], k=1, rounds=1, **huge)


# --- prompt files: byte-order marks and numbers that are not numbers ----------------------------------------------------


def test_utf8_bom_prompt_files_read_like_plain_ones(tmp_path):
    bom = "\ufeff"
    for name, text in (("p.txt", "a red circle\nb\n"), ("p.jsonl", '{"prompt": "a red circle"}\n{"prompt": "b"}\n'),
                       ("p.csv", "prompt\na red circle\nb\n")):
        (tmp_path / name).write_text(bom + text, encoding="utf-8")
        items, bad = read_prompts(str(tmp_path / name))
        assert [i.prompt for i in items] == ["a red circle", "b"] and not bad, (name, items, bad)
    (tmp_path / "pairs.tsv").write_text(bom + 'a "A"\ta "B"\n', encoding="utf-8")
    assert read_pairs(str(tmp_path / "pairs.tsv")) == [('a "A"', 'a "B"')]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text"):
        read_prompts(str(tmp_path / "latin1.txt"))


def test_nan_and_out_of_range_settings_in_prompt_files_are_bad_lines(tmp_path, capsys):
    lines = ['{"prompt": "ok"}', '{"prompt": "a", "guidance_scale": NaN}', '{"prompt": "b", "pag_scale": Infinity}',
             '{"prompt": "c", "seed": -1}', '{"prompt": "d", "steps": 0}', '{"prompt": "e", "size": "100000x100000"}',
             '{"prompt": "f", "height": 0}', '{"prompt": "g", "u": -Infinity}']
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    items, bad = read_prompts(str(tmp_path / "p.jsonl"))
    assert [i.prompt for i in items] == ["ok"] and [b.line for b in bad] == [2, 3, 4, 5, 6, 7, 8]
    reasons = " | ".join(b.reason for b in bad)
    for fragment in ("guidance_scale must be a finite number", "pag_scale must be a finite number", "seed must be in [0, ",
                     "steps must be in [1, 1000]", "machine's budget", "height must be >= 1", "u must be a finite number"):
        assert fragment in reasons, reasons
    out = tmp_path / "out"
    assert main(["generate", "--prompts", str(tmp_path / "p.jsonl"), "--steps", "1", "--size", "32", "--out", str(out)]) == 0
    text = (out / "manifest.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text and len(text.splitlines()) == 1
    assert json.loads(text)["prompt"] == "ok"
    capsys.readouterr()


def test_one_line_parse_errors_name_the_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a", "--size", "big"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err and "(see dit-attn generate --help)" in err


def test_a_png_reference_that_is_too_large_is_refused_from_its_header(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIT_ATTN_MAX_PIXELS", str(64 * 64))
    Image.new("RGB", (128, 128)).save(tmp_path / "big.png")
    assert main(["ic", "a", "--reference", f"0={tmp_path / 'big.png'}", "--out", str(tmp_path / "o")]) == 2
    assert "more than this machine's budget of 4,096" in capsys.readouterr().err
