import pytest

from tpinfer.config import ModelConfig
from tpinfer.parallel.plan import PlanError, resolve_plan

CONFIG = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 101, "hidden_size": 64, "intermediate_size": 96,
                                "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2})

SEED_PLAN = {  # the seeds' custom plan
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}


def test_auto_plan_shards_attention_mlp_and_vocab():
    plan = resolve_plan(CONFIG, 2, "auto")
    assert plan.strategy("model.layers.1.self_attn.k_proj") == "colwise"
    assert plan.strategy("model.layers.0.mlp.down_proj") == "rowwise"
    assert plan.strategy("model.embed_tokens") == "vocab" and plan.strategy("lm_head") == "vocab"
    assert plan.strategy("model.norm") == "replicate"


def test_seed_plan_replicates_what_it_leaves_out():
    plan = resolve_plan(CONFIG, 4, SEED_PLAN)
    assert plan.strategy("model.layers.0.self_attn.q_proj") == "colwise"
    assert plan.strategy("lm_head") == "replicate" and plan.strategy("model.embed_tokens") == "replicate"


def test_everything_replicated_runs_at_any_size():
    plan = resolve_plan(CONFIG, 3, {"model.layers.*.self_attn.*_proj": "replicate"})
    assert plan.strategy("model.layers.1.self_attn.o_proj") == "replicate"


def test_colwise_q_with_replicated_o_is_refused():
    with pytest.raises(PlanError, match="o_proj is replicate.*must be followed by a rowwise o_proj"):
        resolve_plan(CONFIG, 2, {**SEED_PLAN, "model.layers.*.self_attn.o_proj": "replicate"})


def test_mismatched_qkv_is_refused():
    with pytest.raises(PlanError, match="k_proj is replicate: they must match"):
        resolve_plan(CONFIG, 2, {**SEED_PLAN, "model.layers.*.self_attn.k_proj": "replicate"})


def test_rowwise_input_projection_is_refused():
    with pytest.raises(PlanError, match="cannot be rowwise"):
        resolve_plan(CONFIG, 2, {**SEED_PLAN, "model.layers.*.mlp.gate_proj": "rowwise"})


@pytest.mark.parametrize(
    "plan,message",
    [
        ({"model.layers.*.self_attn.q_proj": "diagonal"}, "unknown strategy 'diagonal'"),
        ({"model.layers.*.attn.q_proj": "colwise"}, "matches no module"),
        ({"model.layers.*.input_layernorm": "sequence_parallel"}, "every norm must be sequence_parallel: 2 of 5"),
        ({"model.norm": "colwise"}, "can only be 'replicate'"),
    ],
)
def test_bad_plans_name_the_problem(plan, message):
    with pytest.raises(PlanError, match=message):
        resolve_plan(CONFIG, 2, plan)


def test_sizes_are_validated_for_the_plan():
    with pytest.raises(PlanError, match="8 attention heads are not divisible by tp=3; valid sizes for this model: 1, 2, 4, 8"):
        resolve_plan(CONFIG, 3, "auto")
    with pytest.raises(PlanError, match="intermediate_size 96 is not divisible by tp=5"):
        resolve_plan(CONFIG, 5, {"model.layers.*.mlp.gate_proj": "colwise", "model.layers.*.mlp.up_proj": "colwise",
                                 "model.layers.*.mlp.down_proj": "rowwise"})
