"""Every subcommand's help reads well: a description and at least one example."""

import pytest

from tpinfer.cli.main import SUBCOMMANDS, build_parser, main


def test_top_level_help_lists_commands_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help_has_an_example(capsys, name):
    with pytest.raises(SystemExit):
        main([name, "--help"])
    out = capsys.readouterr().out
    assert f"tpinfer {name}" in out and "example" in out


def test_every_subcommand_is_registered():
    parser = build_parser()
    actions = [a for a in parser._actions if a.dest == "command"]
    assert set(actions[0].choices) == set(SUBCOMMANDS)


def test_serve_defaults_are_the_schedulers():
    from tpinfer.engine.scheduler import MAX_NUM_BATCHED_TOKENS
    from tpinfer.serve.server import ServeConfig

    args = build_parser().parse_args(["serve", "--no-prefix-caching"])
    assert args.max_num_batched_tokens == MAX_NUM_BATCHED_TOKENS == ServeConfig("m").max_num_batched_tokens
    assert args.prefix_caching is False and build_parser().parse_args(["serve"]).prefix_caching is True
