"""The planner's answer launches as-is: ``--layout plan.json`` (or the three flags) on generate, bench and check."""

import json

import pytest

from helpers import make_checkpoint, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("layout") / "tiny", "llama", num_hidden_layers=4)


def _generate(model, *flags: str) -> dict:
    out = run_cli("generate", "--model", str(model), "--max-new-tokens", "6", "--json", *flags, "Hello world").stdout
    return json.loads(out.strip().splitlines()[-1])


def test_generate_with_stages_or_a_plan_file_equals_one_process(model, tmp_path):
    reference = _generate(model)
    assert _generate(model, "--pipeline-parallel-size", "2", "--tp", "2")["token_ids"] == reference["token_ids"]
    # The planner's JSON, recommending a layout for 2 CPU "devices" on one host; passed as-is.
    plan = run_cli("plan", "--model", str(model), "--gpu", "cpu", "--gpus-per-node", "2", "--json").stdout
    file = tmp_path / "plan.json"
    file.write_text(plan)
    recommended = json.loads(plan)["recommended"]
    assert recommended["tp"] * recommended["pp"] * recommended["dp"] == 2
    if recommended["dp"] == 1:
        assert _generate(model, "--layout", str(file))["token_ids"] == reference["token_ids"]
    file.write_text(json.dumps({"tp": 1, "pp": 2, "dp": 1}))
    assert _generate(model, "--layout", str(file))["token_ids"] == reference["token_ids"]


def test_layout_and_flags_must_agree_and_bad_files_are_named(model, tmp_path):
    file = tmp_path / "plan.json"
    file.write_text(json.dumps({"recommended": {"tp": 1, "pp": 2, "dp": 1}}))
    proc = run_cli("generate", "--model", str(model), "--layout", str(file), "--tp", "2", "hi", check=False)
    assert proc.returncode != 0 and "--tensor-parallel-size 2 disagrees with --layout" in proc.stderr
    file.write_text("{not json")
    proc = run_cli("generate", "--model", str(model), "--layout", str(file), "hi", check=False)
    assert proc.returncode != 0 and "not JSON" in proc.stderr
    proc = run_cli("generate", "--model", str(model), "--pp", "5", "hi", check=False)
    assert proc.returncode != 0 and "pp=5 must be between 1 and the model's 4 layers" in proc.stderr
    proc = run_cli("generate", "--model", str(model), "--dp", "2", "hi", check=False)
    assert proc.returncode != 0 and "use tpinfer serve" in proc.stderr


def test_bench_reports_the_pipeline(model):
    out = run_cli("bench", "--model", str(model), "--pp", "2", "--output-len", "8", "--repeat", "1", "--json").stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["tp"], result["pp"]) == (1, 2)
    pipe = result["pipeline"]
    assert pipe["stage_of_rank"] == [0, 1] and pipe["activation_bytes_per_step"] > 0
    assert all(0 <= w < 1 for w in pipe["wait_share"]) and max(pipe["wait_share"]) > 0


def test_check_validates_a_mesh(model, tmp_path):
    ok = run_cli("check", "--model", str(model), "--tp", "2", "--pp", "2", "--json", check=False)
    checks = {c["name"]: c for c in json.loads(ok.stdout)["checks"]}
    assert checks["layers per stage"]["status"] == "pass" and "2, 2" in checks["layers per stage"]["detail"]
    bad = run_cli("check", "--model", str(model), "--tp", "2", "--pp", "8", "--json", check=False)
    assert bad.returncode == 1
    assert "pp=8 must be between 1" in {c["name"]: c for c in json.loads(bad.stdout)["checks"]}[
        "layers per stage"]["detail"]
