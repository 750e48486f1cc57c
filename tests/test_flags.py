"""Settings dataclasses drive argparse: `sct-edge run`'s options come from `RunConfig`'s fields."""

import argparse
import dataclasses

import pytest

from sct_edge.cli import build_parser
from sct_edge.commands.run import run_config_from_args
from sct_edge.errors import SctError
from sct_edge.flags import add_flags, flag, flag_fields, from_flags
from sct_edge.train.trainer import RunConfig


def test_run_without_options_gives_the_dataclass_defaults():
    assert run_config_from_args(build_parser().parse_args(["run"])) == RunConfig()


def test_every_run_flag_field_is_an_option_that_reaches_its_field(tmp_path):
    args = build_parser().parse_args([
        "run", "--profile", "ci", "--store", str(tmp_path), "--rank", "8", "--dense", "--data", str(tmp_path),
        "--steps", "7", "--time-limit", "2.5", "--batch", "3", "--seq", "32", "--micro-batches", "2",
        "--lr-spectral", "0.5", "--lr-dense", "0.25", "--warmup", "4", "--weight-decay", "0.1", "--clip", "0",
        "--eval-every", "5", "--commit-every", "6", "--seed", "9", "--run-dir", str(tmp_path / "r"), "--resume",
        "--budget", "1GiB", "--preset", "tiny",
    ])
    config = run_config_from_args(args)
    assert config == RunConfig(
        profile="ci", budget="1GiB", store=tmp_path, preset="tiny", rank=8, dense=True, data=[str(tmp_path)],
        steps=7, time_limit_s=2.5, batch=3, seq=32, micro_batches=2, lr_spectral=0.5, lr_dense=0.25, warmup=4,
        weight_decay=0.1, clip=None, eval_every=5, commit_every=6, seed=9, run_dir=tmp_path / "r", resume=True,
    )
    # Every option of the parser is a field: nothing is copied by hand.
    assert {f.name for f in flag_fields(RunConfig)} <= set(vars(args))


def test_help_states_each_default_once_from_the_field():
    parser = argparse.ArgumentParser()
    add_flags(parser, RunConfig)
    text = parser.format_help()
    assert "sequences per micro-batch (default: 16)" in " ".join(text.split())
    assert "--eval-windows" not in text and "--min-lr-ratio" not in text  # plain fields stay off the command line


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch must be at least 1"),
    (["--micro-batches", "0"], "--micro-batches must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--data", "/no/such/corpus"], "--data /no/such/corpus: no such file or directory"),
])
def test_bad_run_options_are_one_line_errors(argv, message):
    with pytest.raises(SctError, match=message):
        run_config_from_args(build_parser().parse_args(["run", *argv]))


def test_a_field_of_a_type_argparse_cannot_parse_is_refused():
    @dataclasses.dataclass
    class Odd:
        pair: tuple = flag((1, 2), help="two numbers")

    with pytest.raises(TypeError, match="field pair"):
        add_flags(argparse.ArgumentParser(), Odd)
    assert from_flags(Odd, argparse.Namespace(pair=(3, 4))) == Odd((3, 4))
