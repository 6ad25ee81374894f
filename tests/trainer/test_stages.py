"""Staged training through the real CLI path (``train(cfg)``): three tiny stages 32 -> 64 -> 128 tokens.

The reference is one uninterrupted ``stages=all`` run; every other way of getting through the stages
(one stage per command, a crash and a rerun) must reproduce its per-step losses exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from sbtrain.config.model import ConfigError
from sbtrain.data.loader import PackedLoader
from sbtrain.trainer.optim import lr_at
from tests.trainer.e2e import losses, run

# SMALL (tests/trainer/e2e.py): seq_len 32, global batch 4, micro 2 -> 128 tokens per step in every stage.
PLAN = ("stage_plan=[{name:a,seq_len:32,max_steps:4},"
        "{name:b,seq_len:64,max_steps:3,lr:1e-3,warmup_steps:1},"
        "{name:c,seq_len:128,max_steps:3,lr:5e-4,warmup_steps:2,optimizer:reset,rope:{kind:theta,theta:4e6}}]")
STEPS = {"a": range(1, 5), "b": range(5, 8), "c": range(8, 11)}
# A window of 6 samples: stage a's 16 samples stop inside the third window, so the boundary puts samples back.
STAGED = [PLAN, "data.shuffle_window=6"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """One uninterrupted stages=all run, recording the sample plans every global batch was built from."""
    out = tmp_path_factory.mktemp("staged") / "run"
    plans: list[list] = []
    real = PackedLoader.next_global_batch

    def recording(self):
        plans.append([self.sample_plan(i) for i in range(self.samples_consumed, self.samples_consumed + self.G)])
        return real(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PackedLoader, "next_global_batch", recording)
        # Without prefetch: the spy sits on the loader itself, and a prefetching loader builds batches
        # ahead (dropped at a stage change). The other tests here run with the default prefetch and
        # compare their losses with this run's, exactly: prefetch changes no batch.
        summary = run(dataset, out, *STAGED, "stages=all", "data.prefetch=0")
    return {"out": out, "summary": summary, "plans": plans,
            "losses": {name: losses(out / name) for name in STEPS}}


def test_three_stages_carry_step_and_tokens_and_restart_the_schedule(reference):
    out, summary = reference["out"], reference["summary"]
    assert [s["stage"] for s in summary["stages"]] == ["a", "b", "c"]
    assert summary["step"] == 10 and summary["tokens"] == 10 * 128 and summary["stage"] == "c"
    for name, steps in STEPS.items():
        cfg = yaml.safe_load((out / name / "config.yaml").read_text())
        t = cfg["trainer"]
        assert t["global_batch_size"] * t["seq_len"] == 128  # tokens per step constant: the batch shrinks
        records = [r for r in _lines(out / name / "metrics.jsonl") if r["kind"] == "train"]
        assert [r["step"] for r in records] == list(steps)  # the step count carries over
        assert [r["tokens"] for r in records] == [128 * s for s in steps]  # and so does the token count
        # Each stage's own schedule, starting over at its first step (hand-computed from optim.lr_at).
        schedule = type("S", (), {"lr": cfg["optim"]["lr"], "min_lr_ratio": 0.1, "schedule": "cosine",
                                  "warmup_steps": cfg["optim"]["warmup_steps"], "decay_fraction": 0.2})
        expected = [lr_at(i, len(steps), schedule) for i in range(len(steps))]
        assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12)
        done = json.loads((out / name / "stage_done.json").read_text())
        assert done["step"] == steps[-1] and Path(done["checkpoint"]).name == f"step_{steps[-1]:08d}"
    assert next(r["lr"] for r in _lines(out / "b" / "metrics.jsonl")) == pytest.approx(1e-3)  # b's warmup is 1 step
    assert yaml.safe_load((out / "c" / "config.yaml").read_text())["model"]["rope_base"] == 4e6
    assert yaml.safe_load((out / "b" / "config.yaml").read_text())["model"]["rope_base"] == 1e6
    assert all(np.isfinite(v) for stage in reference["losses"].values() for v in stage.values())


def test_no_token_is_seen_twice_across_the_stage_boundaries(reference):
    plans = reference["plans"]
    assert [len(p) for p in plans] == [4] * 4 + [2] * 3 + [1] * 3
    seen: dict[int, set] = {}
    total = 0
    for batch in plans:
        for plan in batch:
            assert sum(e - s for _, _, s, e in plan) in (33, 65, 129)  # seq_len + 1 of its stage
            for _, doc, start, end in plan:
                span = set(range(start, end))
                assert not span & seen.setdefault(doc, set()), f"document {doc} tokens {start}:{end} seen twice"
                seen[doc] |= span
                total += end - start
    assert total == 16 * 33 + 6 * 65 + 3 * 129  # every sample of every stage came from fresh tokens


def test_one_stage_per_command_matches_stages_all(dataset, reference, tmp_path):
    first = run(dataset, tmp_path, *STAGED, "stage=a")
    assert first["step"] == 4 and first["stage"] == "a"
    second = run(dataset, tmp_path, *STAGED, "stage=b")  # picks up a's final checkpoint by itself
    assert second["step"] == 7 and second["tokens"] == 7 * 128 and second["resumed_from"] is None
    assert losses(tmp_path / "a") == reference["losses"]["a"]
    assert losses(tmp_path / "b") == reference["losses"]["b"]  # exactly: the same weights, moments, data, RNG


def test_a_stage_without_its_previous_stage_is_an_error(dataset, tmp_path):
    with pytest.raises(ConfigError, match="stage b starts from stage a's final checkpoint.*run stage=a first"):
        run(dataset, tmp_path, *STAGED, "stage=b")
    assert not (tmp_path / "b").exists()  # failed before building anything


def test_crash_inside_stage_b_then_stages_all_resumes_b_exactly(dataset, reference, tmp_path):
    crashed = run(dataset, tmp_path, *STAGED, "stages=all", "trainer.exit_at_step=6")
    assert crashed["stopped_by"] == "exit_at_step" and crashed["step"] == 6 and crashed["stage"] == "b"
    assert not (tmp_path / "c").exists() and not (tmp_path / "b" / "stage_done.json").exists()
    a_lines = (tmp_path / "a" / "metrics.jsonl").read_text()
    resumed = run(dataset, tmp_path, *STAGED, "stages=all")
    assert [s.get("skipped", False) for s in resumed["stages"]] == [True, False, False]  # a is not run again
    assert resumed["stages"][1]["resumed_from"].endswith("b/checkpoints/step_00000006")  # b from its own checkpoint
    assert resumed["stages"][2]["resumed_from"] is None  # c from b's final checkpoint
    assert [r["step"] for r in _lines(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "train"] == [5, 6, 7]
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == a_lines
    assert resumed["step"] == 10
    for name in STEPS:  # per-step losses equal the uninterrupted run's, bit for bit
        assert losses(tmp_path / name) == reference["losses"][name], name


@pytest.mark.parametrize("override, message", [
    ("stage=x", r"stage=x is not in stage_plan.*stages: a, b, c"),
    ("stage=all", "use stages=all"),
    ("stages=some", "stages='some' is unknown"),
])
def test_bad_stage_selection_names_the_fix(dataset, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run(dataset, tmp_path, *STAGED, override)


def test_batch_that_cannot_keep_tokens_per_step_is_an_error(dataset, tmp_path):
    plan = "stage_plan=[{name:a,seq_len:32,max_steps:1},{name:b,seq_len:96,max_steps:1}]"
    with pytest.raises(ConfigError, match="seq_len=96 does not divide the run's tokens per step 128"):
        run(dataset, tmp_path, plan, "stages=all")
    assert not (tmp_path / "a").exists()  # checked before the first stage trains


# The same plan with sb7b_cpt.yaml's shape: stage a data parallel over the 2 ranks, stages b and c
# context parallel (cp=2, no data parallelism left), so the mesh changes at the a -> b boundary.
PLAN_CP = PLAN.replace("{name:b,seq_len:64,", "{name:b,seq_len:64,cp:2,").replace(
    "{name:c,seq_len:128,", "{name:c,seq_len:128,cp:2,")


def _staged_two_ranks(dataset: str, out: str) -> dict:
    return run(dataset, Path(out), PLAN_CP, "data.shuffle_window=6", "stages=all")


@pytest.mark.distributed
def test_cp_degree_changes_between_stages_on_two_ranks(dataset, reference, tmp_path):
    """dp=2 -> cp=2 at a stage boundary: the FSDP shards of stage a's final checkpoint load into the
    cp mesh, the document cursor carries over, and every step's loss equals the one-process run's
    (up to the summation order of the sharded loss and the CP state exchange)."""
    from tests.distributed.harness import run_distributed

    assert "cp:2" in PLAN_CP and PLAN_CP.count("cp:2") == 2
    summaries = run_distributed(_staged_two_ranks, 2, dataset, str(tmp_path), timeout=600)
    assert [s["stage"] for s in summaries[0]["stages"]] == ["a", "b", "c"] and summaries[0]["step"] == 10
    for name in ("b", "c"):
        assert yaml.safe_load((tmp_path / name / "config.yaml").read_text())["parallel"]["cp"] == 2
    for name, steps in STEPS.items():
        got, ref = losses(tmp_path / name), reference["losses"][name]
        assert sorted(got) == list(steps)
        np.testing.assert_allclose([got[s] for s in steps], [ref[s] for s in steps], rtol=0, atol=2e-5, err_msg=name)


def test_yarn_stages_resolve_factor_and_original_length():
    from sbtrain.config.stages import RopeScalingConfig, StageConfig, validate_plan
    from sbtrain.trainer.stages import rope_in_force

    def stage(name, seq_len, **rope):
        return StageConfig(name=name, seq_len=seq_len, max_steps=1, rope=RopeScalingConfig(**rope))

    plan = validate_plan([stage("a", 8192), stage("b", 32768, kind="yarn"), stage("c", 131072, kind="yarn"),
                          stage("d", 131072, kind="theta", theta=4e6)])
    assert rope_in_force(plan, 0, 8192) == (None, None)
    _, b = rope_in_force(plan, 1, 8192)
    assert (b.factor, b.original_max_position, b.beta_fast, b.beta_slow) == (4.0, 8192, 32.0, 1.0)
    _, c = rope_in_force(plan, 2, 8192)  # the original length stays the pre-YaRN one
    assert (c.factor, c.original_max_position) == (16.0, 8192)
    theta, d = rope_in_force(plan, 3, 8192)  # a later theta stage changes the base, YaRN stays in force
    assert theta == 4e6 and d == c
    explicit = validate_plan([stage("a", 4096, kind="yarn", factor=2.0, original_max_position=1024)])
    assert rope_in_force(explicit, 0, 4096)[1].factor == 2.0
    with pytest.raises(ConfigError, match="YaRN factor 0.5 .* is below 1"):
        rope_in_force(validate_plan([stage("a", 8192), stage("b", 4096, kind="yarn")]), 1, 8192)
    with pytest.raises(ConfigError, match=r"rope.factor apply to rope.kind=yarn only \(kind is 'theta'\)"):
        validate_plan([stage("a", 8192, kind="theta", theta=1e6, factor=2.0)])
    with pytest.raises(ConfigError, match="rope.beta_fast, rope.attention_factor apply to rope.kind=yarn only"):
        validate_plan([stage("a", 8192, beta_fast=16.0, attention_factor=1.2)])
    with pytest.raises(ConfigError, match="rope.theta=1000000.0 applies to rope.kind=theta only .kind is 'yarn'"):
        validate_plan([stage("a", 8192, kind="yarn", theta=1e6)])


def test_a_yarn_stage_is_recorded_and_changes_the_training(dataset, tmp_path):
    plan = "stage_plan=[{name:a,seq_len:32,max_steps:2},{name:b,seq_len:64,max_steps:2,rope:{kind:%s}}]"
    # init_std 0.3: attention logits far from 0 at once, so the temperature and frequencies show in the loss
    yarn = run(dataset, tmp_path / "yarn", plan % "yarn", "stages=all", "model.init_std=0.3")
    plain = run(dataset, tmp_path / "plain", plan % "none", "stages=all", "model.init_std=0.3")
    assert yarn["step"] == plain["step"] == 4
    model = yaml.safe_load((tmp_path / "yarn" / "b" / "config.yaml").read_text())["model"]
    assert model["rope_yarn"]["factor"] == 2.0 and model["rope_yarn"]["original_max_position"] == 32
    assert losses(tmp_path / "yarn" / "a") == losses(tmp_path / "plain" / "a")
    b_yarn, b_plain = losses(tmp_path / "yarn" / "b"), losses(tmp_path / "plain" / "b")
    assert all(abs(b_yarn[s] - b_plain[s]) > 1e-4 for s in (3, 4)), (b_yarn, b_plain)
