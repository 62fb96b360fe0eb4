"""Pooling as sentence-transformers configures and computes it: its files read, its Pooling module's arithmetic."""

import json

import pytest
import torch

from tpinfer.config import ConfigError
from tpinfer.pooling import MODES, PoolingConfig, pool

TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
NORMALIZE = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}


def _write(path, modules, pooling=None, sentence=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (path / "1_Pooling").mkdir(exist_ok=True)
        (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if sentence is not None:
        (path / "sentence_bert_config.json").write_text(json.dumps(sentence))
    return path


def test_legacy_and_new_pooling_keys_and_normalize(tmp_path):
    legacy = {"word_embedding_dimension": 8, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
              "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
    config = PoolingConfig.from_pretrained(_write(tmp_path / "a", [TRANSFORMER, POOLING, NORMALIZE], legacy,
                                                  {"max_seq_length": 256, "do_lower_case": False}))
    assert config == PoolingConfig(("mean",), normalize=True, max_seq_length=256)
    assert config.describe() == "mean pooling, normalized"
    config = PoolingConfig.from_pretrained(_write(tmp_path / "b", [TRANSFORMER, POOLING],
                                                  {"pooling_mode": ["cls", "lasttoken"]}, {"do_lower_case": True}))
    assert config == PoolingConfig(("cls", "lasttoken"), normalize=False, lower_case=True)


def test_no_modules_json_is_mean_pooling_without_normalisation_and_says_so(tmp_path):
    config = PoolingConfig.from_pretrained(tmp_path)
    assert (config.modes, config.normalize, config.default) == (("mean",), False, True)
    assert "tpinfer's default" in config.describe()


@pytest.mark.parametrize("modules, pooling, message", [
    ([TRANSFORMER, POOLING, {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}],
     {"pooling_mode": "mean"},
     "module sentence_transformers.models.Dense \\(2_Dense\\) is not supported; tpinfer runs Transformer, Pooling"),
    ([TRANSFORMER, POOLING], {"pooling_mode": "weightedmean"}, "pooling mode 'weightedmean' is not supported"),
    ([TRANSFORMER, POOLING], {"pooling_mode_mean_tokens": False}, "no pooling mode is set"),
    ([TRANSFORMER], None, "modules Transformer; tpinfer runs Transformer, Pooling and optionally Normalize"),
    ([TRANSFORMER, POOLING], None, "1_Pooling/config.json is missing"),
])
def test_what_tpinfer_does_not_run_is_refused_by_name(tmp_path, modules, pooling, message):
    with pytest.raises(ConfigError, match=message):
        PoolingConfig.from_pretrained(_write(tmp_path, modules, pooling))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [False, True])
def test_pool_equals_sentence_transformers_pooling(mode, normalize):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    torch.manual_seed(0)
    hidden = torch.randn(4, 7, 16)
    lengths = [7, 5, 1, 3]  # right-padded rows, one of a single token
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    features = {"token_embeddings": hidden, "attention_mask": mask}
    expected = Pooling(16, pooling_mode=mode)(features)["sentence_embedding"]
    if normalize:
        expected = Normalize()({"sentence_embedding": expected})["sentence_embedding"]
    got = pool(hidden, mask, PoolingConfig((mode,), normalize=normalize))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # the same float32 operations
