"""Bad inputs, through the CLI in-process: each gives exit code 2 and one message naming the file
(and line) or the config key, no traceback, and changes no file already written.

Every case runs against a copy of a real run directory (one trained step, a checkpoint,
metrics.jsonl): the bad input is met while resuming it, and every file under the case's directory
(the run, its data, its model copies) must be byte-identical afterwards, with no file added.
"""

import errno
import importlib.util
import json
import os
import pathlib
import shutil
from pathlib import Path

import jax
import pytest

from conftest import DEMO_TRAIN
from jaxsft import cli
from jaxsft.config import load_config
from jaxsft.train import train

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def base_overrides(model: Path, data: Path, run_dir: Path) -> list[str]:
    return [f"model.path={model}", f"data.train={data}", "data.seq_len=128", "train.steps=2",
            "train.batch_size=8", "train.log_every=1", "checkpoint.every=1", "mesh.data=1", "mesh.fsdp=-1",
            f"run.dir={run_dir}", "run.export=", "run.plot=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama) -> tuple[Path, Path]:
    """`(run_dir, data)`: a run of one step on 32 demo records, checkpointed."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "train.jsonl"
    data.write_text("".join(DEMO_TRAIN.read_text().splitlines(keepends=True)[:32]))
    run_dir = root / "run"
    cfg = load_config(None, base_overrides(tiny_llama, data, run_dir)[:-4] + [
        "train.steps=1", "mesh.fsdp=1", f"run.dir={run_dir}", "run.plot=false", "run.tensorboard=false"])
    train(cfg, devices=jax.devices()[:1])
    assert (run_dir / "checkpoints" / "1").is_dir() and (run_dir / "metrics.jsonl").is_file()
    return run_dir, data


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def lines_file(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = '{"prompt": "Say hi.", "completion": "hi"}'


# Each case: (id, setup(case_dir, run_dir, model, data) -> argv, the text the message must hold).
# `{dir}` in the expected text stands for the case directory.
def _data(*lines):
    def setup(d, run, model, data):
        return ["train", "-", *base_overrides(model, lines_file(d / "bad.jsonl", *lines), run)]
    return setup


def _overrides(*extra):
    def setup(d, run, model, data):
        return ["train", "-", *base_overrides(model, data, run), *extra]
    return setup


def _model(edit):
    def setup(d, run, model, data):
        bad = copy_model(model, d / "model")
        edit(bad)
        return ["train", "-", *base_overrides(bad, data, run)]
    return setup


def _no_tokenizer(m: Path):
    for name in TOKENIZER_FILES:
        (m / name).unlink(missing_ok=True)


def _pickle_only(m: Path):
    (m / "model.safetensors").unlink()
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


def _config_file(text):
    def setup(d, run, model, data):
        (d / "bad.yaml").write_text(text)
        return ["train", str(d / "bad.yaml"), *base_overrides(model, data, run)]
    return setup


def _run_dir_under_file(d, run, model, data):
    (d / "a-file").write_text("not a directory\n")
    return ["train", "-", *base_overrides(model, data, d / "a-file" / "run")]


def _eval_data(d, run, model, data):
    return ["train", "-", *base_overrides(model, data, run), f"data.eval={lines_file(d / 'eval.jsonl', GOOD, '{')}"]


def _export_nonempty(d, run, model, data):
    (d / "out").mkdir()
    (d / "out" / "keep.txt").write_text("mine\n")
    return ["export", str(run), str(d / "out")]


def _export_not_a_run(d, run, model, data):
    (d / "somewhere").mkdir()
    return ["export", str(d / "somewhere"), str(d / "out")]


def _plot_not_a_run(d, run, model, data):
    (d / "empty").mkdir()
    return ["plot", str(d / "empty")]


CASES = [
    ("malformed_jsonl_line", _data(GOOD, GOOD, '{"prompt": "x", "completion": '), ["bad.jsonl:3", "not valid JSON"]),
    ("json_array_not_lines", _data('[{"prompt": "x", "completion": "y"}]'), ["bad.jsonl:1", "one record per line"]),
    ("record_missing_completion", _data(GOOD, '{"prompt": "x"}'), ["bad.jsonl:2", "completion"]),
    ("empty_completion", _data(GOOD, '{"prompt": "x", "completion": ""}'), ["bad.jsonl:2", "no trained tokens"]),
    ("non_string_prompt", _data(GOOD, '{"prompt": 5, "completion": "y"}'), ["bad.jsonl:2", "'prompt' must be a string"]),
    ("record_not_an_object", _data(GOOD, '"just a string"'), ["bad.jsonl:2", "expected a JSON object"]),
    ("empty_file", _data(), ["bad.jsonl", "holds no records"]),
    ("missing_data_path", _overrides("data.train={dir}/nowhere.jsonl"), ["data file not found", "nowhere.jsonl"]),
    ("bad_eval_data", _eval_data, ["eval.jsonl:2", "not valid JSON"]),
    ("missing_model_dir", _overrides("model.path={dir}/no-model"), ["model directory not found", "no-model"]),
    ("model_without_tokenizer", _model(_no_tokenizer), ["model", "tokenizer"]),
    ("unsupported_model_type", _model(lambda m: edit_json(m / "config.json", model_type="mamba")),
     ["config.json", "'mamba'", "supported"]),
    ("config_json_not_json", _model(lambda m: (m / "config.json").write_text("{not json")),
     ["config.json", "not valid JSON"]),
    ("pickle_only_checkpoint", _model(_pickle_only), ["pytorch_model.bin", "safetensors"]),
    ("safetensors_shapes_differ_from_config", _model(lambda m: edit_json(m / "config.json", intermediate_size=96)),
     ["has shape", "config.json implies"]),
    ("unknown_config_key", _overrides("train.stepz=3"), ["train.stepz"]),
    ("wrong_typed_config_value", _overrides("train.steps=many"), ["train.steps", "integer"]),
    ("negative_steps", _overrides("train.steps=-1"), ["train.steps", ">= 0"]),
    ("config_file_missing", lambda d, run, m, data: ["train", str(d / "missing.yaml")], ["config file not found"]),
    ("config_file_not_yaml", _config_file("model: [unclosed\n"), ["bad.yaml", "not valid YAML"]),
    ("mesh_product_not_device_count", _overrides("mesh.data=3", "mesh.fsdp=1"), ["mesh.data", "8 devices"]),
    ("seq_len_below_shortest_example", _overrides("data.seq_len=8"), ["train.jsonl", "data.seq_len"]),
    ("batch_not_divisible_by_data_parallel", _overrides("mesh.data=8", "mesh.fsdp=1", "train.batch_size=4"),
     ["train.batch_size", "data-parallel"]),
    ("chat_template_fails_to_render",
     _model(lambda m: (m / "chat_template.jinja").write_text("{{ raise_exception('no conversations here') }}")),
     ["train.jsonl:1", "chat template failed to render"]),
    ("run_dir_through_a_file", _run_dir_under_file, ["run.dir", "a-file", "not a directory"]),
    ("export_into_nonempty_dir", _export_nonempty, ["out", "not empty"]),
    ("export_from_not_a_run", _export_not_a_run, ["somewhere", "neither a run directory"]),
    ("plot_without_metrics", _plot_not_a_run, ["empty", "no metrics.jsonl"]),
]


def run_case(capsys, argv: list[str], case_dir: Path, expected: list[str]) -> str:
    argv = [a.replace("{dir}", str(case_dir)) for a in argv]
    if argv[:2] == ["train", "-"]:  # no config file: overrides only
        argv = ["train", str(case_dir / "empty.yaml"), *argv[2:]]
        (case_dir / "empty.yaml").write_text("{}\n")
    before = snapshot(case_dir)
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"jaxsft {argv[0]}: error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err  # one message, and the last thing said
    for text in expected:
        assert text.replace("{dir}", str(case_dir)) in errors[0], errors[0]
    assert snapshot(case_dir) == before  # nothing already written changed, nothing half-written added
    return errors[0]


def test_checkpoint_of_another_model(tmp_path, capsys, tiny_llama, tiny_llama_tied, trained):
    run_dir, data = trained
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    message = run_case(capsys, ["train", "-", *base_overrides(tiny_llama_tied, data, run)], tmp_path,
                       ["another model", str(tiny_llama), str(tiny_llama_tied), "lm_head"])
    assert "new run.dir" in message


def test_disk_full_leaves_the_run_as_it_was(tmp_path, capsys, monkeypatch, tiny_llama, trained):
    run_dir, data = trained
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    write_text = pathlib.Path.write_text

    def full(self, *args, **kwargs):  # the disk fills up while config.yaml is rewritten
        if self.parent == run:
            fd = os.open(self, os.O_WRONLY | os.O_CREAT)
            os.write(fd, b"model: {pa")  # part of a write, then no space
            os.close(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    message = run_case(capsys, ["train", "-", *base_overrides(tiny_llama, data, run)], tmp_path,
                       ["No space left on device", str(run)])
    assert "config.yaml" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555; run_dir_through_a_file covers "
                                              "an unwritable run.dir under root")
def test_read_only_run_dir(tmp_path, capsys, tiny_llama, trained):
    run_dir, data = trained
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    run.chmod(0o555)
    try:
        run_case(capsys, ["train", "-", *base_overrides(tiny_llama, data, run)], tmp_path,
                 ["run.dir", "cannot write"])
    finally:
        run.chmod(0o755)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_project_without_wandb(tmp_path, capsys, tiny_llama, trained):
    run_dir, data = trained
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    run_case(capsys, ["train", "-", *base_overrides(tiny_llama, data, run), "run.wandb_project=demo"], tmp_path,
             ["run.wandb_project", "pip install"])


# More cases, same contract: one message naming the key or the file, exit 2, nothing changed.
def _hf_copy(edit):
    def setup(d, run, model, data):
        bad = copy_model(model, d / "model")
        edit(bad)
        return ["export", str(bad), str(d / "out")]
    return setup


def _generate(*args, prompts=None):
    def setup(d, run, model, data):
        extra = ["--file", str(lines_file(d / "prompts.jsonl", *prompts))] if prompts else []
        return ["generate", str(model), *args, *extra]
    return setup


def _inspect(*extra):
    def setup(d, run, model, data):
        (d / "empty.yaml").write_text("{}\n")
        return ["data", "inspect", str(d / "empty.yaml"), *base_overrides(model, data, run), *extra]
    return setup


MORE_CASES = [
    ("negative_lr", _overrides("optimizer.lr=-0.001"), ["optimizer.lr", ">= 0"]),
    ("weights_not_one_per_file", _overrides("data.weights=[1,2]"), ["data.weights", "one per entry"]),
    ("grad_accum_not_dividing_batch", _overrides("train.grad_accum=3"), ["train.batch_size", "train.grad_accum"]),
    ("two_mesh_axes_fill", _overrides("mesh.data=-1"), ["at most one of", "mesh.data"]),
    ("label_in_set_without_labels", _overrides("eval.metrics=[label_in_set]"), ["eval.metrics", "eval.labels"]),
    ("user_metric_not_module_function", _overrides("eval.user_metric=nocolon"), ["eval.user_metric", "pkg.module"]),
    ("eval_top_p_out_of_range", _overrides("eval.top_p=0"), ["eval.top_p", "(0, 1]"]),
    ("inspect_missing_data", _inspect("data.train={dir}/nowhere.jsonl"), ["data file not found", "nowhere.jsonl"]),
    ("export_bad_shard_size", lambda d, run, m, data: ["export", str(run), str(d / "out"), "--max-shard-size", "lots"],
     ["max shard size", "'lots'"]),
    ("export_hf_dir_config_not_json", _hf_copy(lambda m: (m / "config.json").write_text("{not json")),
     ["config.json", "not valid JSON"]),
    ("export_hf_dir_without_weights", _hf_copy(lambda m: (m / "model.safetensors").unlink()),
     ["model", "no model.safetensors"]),
    ("generate_without_prompt", _generate(), ["exactly one of --prompt", "--file"]),
    ("generate_bad_setting", _generate("--prompt", "hi", "top_p=2"), ["top_p", "(0, 1]"]),
    ("generate_record_without_prompt", _generate(prompts=['{"prompt": "hi"}', '{"question": "x"}']),
     ["prompts.jsonl:2", "neither a 'prompt' nor a 'messages'"]),
]


@pytest.mark.parametrize("name,setup,expected", CASES + MORE_CASES, ids=[c[0] for c in CASES + MORE_CASES])
def test_bad_input(tmp_path, capsys, tiny_llama, trained, name, setup, expected):
    run_dir, data = trained
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    run_case(capsys, setup(tmp_path, run, tiny_llama, data), tmp_path, expected)


# Behaviour that must not be silent: each says what it did in one line.
def copied_run(tmp_path, trained) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    (tmp_path / "empty.yaml").write_text("{}\n")
    return run


def test_zero_lr_warns_at_start(tmp_path, capsys, tiny_llama, trained):
    run = copied_run(tmp_path, trained)
    before = snapshot(run)
    capsys.readouterr()
    overrides = base_overrides(tiny_llama, trained[1], run) + ["train.steps=1", "optimizer.lr=0"]
    assert cli.main(["train", str(tmp_path / "empty.yaml"), *overrides]) == 0  # a warning, not an error
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "optimizer.lr" in line]
    assert warnings == ["warning: optimizer.lr is 0: the steps run but the weights will not change"], err
    assert err.splitlines()[0] == warnings[0]  # said first
    assert snapshot(run) == before


def test_train_says_where_it_exported(tmp_path, capsys, tiny_llama, trained):
    run = copied_run(tmp_path, trained)
    out = tmp_path / "exported"
    capsys.readouterr()
    overrides = base_overrides(tiny_llama, trained[1], run)[:-2] + [f"run.export={out}", "run.plot=false"]
    assert cli.main(["train", str(tmp_path / "empty.yaml"), *overrides]) == 0
    err = capsys.readouterr().err
    assert err.rstrip().splitlines()[-1] == f"exported {out}", err[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_generate_system_prompt(tmp_path, capsys, monkeypatch, tiny_llama):
    from jaxsft import generate

    seen = []
    render = generate.render_prompt
    monkeypatch.setattr(generate, "render_prompt", lambda tok, prompt, system=None: seen.append(system) or
                        render(tok, prompt, system))
    capsys.readouterr()
    assert cli.main(["generate", str(tiny_llama), "--prompt", "Say hi.", "--system", "Be brief.",
                     "max_new_tokens=2"]) == 0
    assert seen == ["Be brief."] and len(capsys.readouterr().out.splitlines()) >= 1
    prompts = lines_file(tmp_path / "prompts.jsonl", '{"prompt": "Say hi.", "system": "Answer in French."}',
                         '{"prompt": "Say bye."}')
    before, seen[:] = snapshot(tmp_path), []
    assert cli.main(["generate", str(tiny_llama), "--file", str(prompts), "--system", "Be brief.",
                     "max_new_tokens=2"]) == 0
    echoed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert seen == ["Answer in French.", "Be brief."]  # the record's own system wins over --system
    assert [(e["prompt"], e["system"]) for e in echoed] == [("Say hi.", "Answer in French."), ("Say bye.", "Be brief.")]
    assert snapshot(tmp_path) == before


def test_export_from_a_hugging_face_directory(tmp_path, capsys, tiny_llama):
    import ml_dtypes
    import numpy as np

    from jaxsft.models.hf_io import SafetensorsReader

    before = snapshot(tiny_llama)
    capsys.readouterr()
    assert cli.main(["export", str(tiny_llama), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip() == f"exported {tmp_path / 'out'}"
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"
    assert all((out / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"))
    with SafetensorsReader(tiny_llama) as src, SafetensorsReader(out) as dst:
        assert sorted(src.files) == sorted(dst.files)
        for name in src.files:
            want = src.file(name).read(name, ()).astype(ml_dtypes.bfloat16)
            np.testing.assert_array_equal(dst.file(name).read(name, ()), want)
    assert snapshot(tiny_llama) == before
