"""bench/ppo_throughput.py on CPU: it runs (GPT-2 whole and with LoRA, a Llama with either
decoder), writes its JSON where told, and every malformed argument is a clear error. The
figures themselves are measured, not tested."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "ppo_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ppo_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("rank,family,generation,chunk,value", [
    (0, "gpt2", "auto", 0, "shared"), (4, "gpt2", "auto", 4, "reward"), (0, "llama", "static", 0, "shared"),
    (0, "llama", "dynamic", 0, "shared"), (0, "qwen3", "static", 0, "reward"), (0, "gemma3", "static", 0, "shared"),
    (0, "phi3", "static", 0, "shared"), (0, "pythia", "static", 0, "shared"), (0, "olmo2", "static", 0, "shared"),
    (0, "gemma2", "static", 0, "shared"), (0, "gemma4", "static", 0, "reward")])
def test_tiny_shape_runs_on_cpu(bench, tmp_path, capsys, rank, family, generation, chunk, value):
    out = tmp_path / "out"
    bench.main(["--shape", "tiny", "--no-reference", "--repeats", "1", "--json", "--lora", str(rank),
                "--family", family, "--generation", generation, "--generation-batch", str(chunk), "--out", str(out),
                "--value-model", value])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((out / "ppo_throughput.json").read_text())
    ours = printed["ours"]
    assert printed["lora_rank"] == rank and printed["reference"] is None and printed["ratio"] is None
    assert printed["family"] == family and printed["generation"] == generation
    assert printed["generation_batch"] == chunk
    policy, reward = {"gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
                      "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
                      "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
                      "gemma3": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
                      "phi3": ("Phi3ForCausalLM", "Phi3ForSequenceClassification"),
                      "pythia": ("GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification"),
                      "olmo2": ("Olmo2ForCausalLM", "Olmo2ForSequenceClassification"),
                      "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
                      "gemma4": ("Gemma4ForCausalLM", "Gemma4TextForSequenceClassification")}[family]
    # the reward model is of the policy's family; a critic (--value-model reward) is its trunk and score head
    trunk = {"gpt2": "GPT2Model", "qwen3": "Qwen3Model", "gemma4": "Gemma4TextModel"}.get(family)
    assert ours["models"] == {"policy": policy, "reward": reward,
                              "value": f"critic: {trunk}" if value == "reward" else "policy's trunk"}
    assert printed["value_model"] == value and ("critic" in ours["system"]) == (value == "reward")
    assert ("LoRA" in ours["system"]) == bool(rank) and (family in ours["system"]) == (family != "gpt2")
    assert ("HF cache" in ours["system"]) == (generation == "dynamic")
    assert ours["episodes_per_s"] > 0 and 0 < ours["gen_fraction"] < 1
    if generation == "dynamic":
        assert ours["decode_ops_per_token"] is None
    else:  # 2 layers, each at least norms, projections, cache writes, two products, softmax and MLP
        ops = ours["decode_ops_per_token"]
        assert 2 * 10 < ops["step"] < 2 * 100 and ops["sampling"] >= 3, ops
    # 32 prompts of batch 8: 4 steps of 8 episodes of 16 tokens each
    assert ours["gen_tokens_per_s"] == pytest.approx(ours["episodes_per_s"] * 16, rel=0.01)


def test_mixed_precision_runs_on_cpu(bench, tmp_path, capsys):
    """--mixed: float32 weights under bf16 autocast (the pipeline's GPU setting), here on the CPU;
    its decoder counts the same operations per token as over bf16 weights (it reads bf16 copies)."""
    runs = {}
    for mixed in (False, True):
        bench.main(["--shape", "tiny", "--no-reference", "--repeats", "1", "--json", "--out", str(tmp_path)]
                   + (["--mixed"] if mixed else []))
        runs[mixed] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert runs[True]["mixed_precision"] and not runs[False]["mixed_precision"]
    assert "mixed" in runs[True]["ours"]["system"] and "mixed" not in runs[False]["ours"]["system"]
    assert runs[True]["ours"]["episodes_per_s"] > 0
    # float32 weights computed as they are cast nothing; over the bf16 copies nothing either
    assert runs[True]["ours"]["decode_ops_per_token"] == runs[False]["ours"]["decode_ops_per_token"]


def test_a_failing_reference_is_reported(bench, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import sys\nprint('no json here')\nsys.exit(3)\n")
    silent = tmp_path / "silent.py"
    silent.write_text("print('no json here')\n")
    common = ["--shape", "tiny", "--repeats", "1", "--out", str(tmp_path), "--reference-python", sys.executable]
    with pytest.raises(SystemExit, match="the reference failed"):
        bench.main([*common, "--reference-script", str(broken)])
    with pytest.raises(SystemExit, match="printed no JSON line"):
        bench.main([*common, "--reference-script", str(silent)])


@pytest.mark.parametrize("args,expected", [
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--lora", "-2"], "--lora must be a rank >= 0"),
    (["--lora", "eight"], "invalid int value"),
    (["--shape", "7b"], "invalid choice"),
    (["--device", "tpu"], "invalid choice"),
    (["--family", "t5"], "invalid choice"),
    (["--generation", "fast"], "invalid choice"),
    (["--value-model", "separate"], "invalid choice"),
    (["--generation-batch", "3"], "--generation-batch must divide the tiny shape's batch of 8"),
    (["--generation-batch", "-1"], "--generation-batch must divide"),
    (["--family", "llama"], "builds GPT-2 only; add --no-reference"),
    ([], "pass --reference-python"),
    (["--reference-python", "/no/such/python"], "no such interpreter"),
    (["--reference-python", sys.executable, "--reference-script", "/no/such/script.py"], "not found"),
    (["--out", __file__], "is a file, not a folder"),
])
def test_malformed_arguments_are_named(bench, args, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--repeats", "1", *args] if args[:1] != ["--repeats"] else args)
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_named(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda", "--no-reference"])
    assert "no CUDA device here" in capsys.readouterr().err


def test_the_win_rate_interval_simulation_runs_and_names_bad_arguments(tmp_path, capsys):
    """bench/win_rate_interval.py: one JSON object and its file, every row's shares within [0, 1];
    bad arguments exit 2 with their name. Its figures are measured (bench/README.md), not tested."""
    spec = importlib.util.spec_from_file_location("win_rate_interval", BENCH.parent / "win_rate_interval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--repeats", "2", "--out", str(tmp_path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads((tmp_path / "win_rate_interval.json").read_text())
    assert [(r["prompts"], r["samples"], r["mu"]) for r in out["rows"]] == [
        (k, m, mu) for mu in (0.0, module.MU_BETTER) for k, m in module.SHAPES]
    assert all(0 <= r[k] <= 1 for r in out["rows"] for k in ("passed_over_pairs", "passed_over_prompts", "icc"))
    for args, said in [(["--repeats", "0"], "--repeats must be at least 1, got 0"), (["--repeats", "x"], "invalid int"),
                       (["--out", __file__], "is a file, not a folder")]:
        with pytest.raises(SystemExit) as exc:
            module.main(args)
        assert exc.value.code == 2 and said in capsys.readouterr().err


def test_the_import_and_validation_benchmark_runs_both_formats_and_names_bad_arguments(tmp_path, capsys):
    """bench/import_validate.py: every synthetic pair imported and accepted, from JSON lines and
    from a Label Studio export; bad arguments exit 2 with their name. Its figures are measured
    (bench/README.md), not tested."""
    spec = importlib.util.spec_from_file_location("import_validate", BENCH.parent / "import_validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for fmt in ("jsonl", "label-studio"):
        module.main(["--rows", "40", "--format", fmt, "--out", str(tmp_path), "--json"])
        out = json.loads(capsys.readouterr().out)
        assert out == json.loads((tmp_path / "import_validate.json").read_text())
        assert out["format"] == fmt and out["import"]["kept"] == out["validate"]["accepted"] == 40
    for args, said in [(["--rows", "0"], "--rows must be at least 1, got 0"), (["--rows", "x"], "invalid int"),
                       (["--format", "csv"], "invalid choice: 'csv'"), (["--out", __file__], "is a file, not a folder")]:
        with pytest.raises(SystemExit) as exc:
            module.main(args)
        assert exc.value.code == 2 and said in capsys.readouterr().err
