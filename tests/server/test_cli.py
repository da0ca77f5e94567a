"""`conceptlens serve` argument checks: every mistake is one line and exit 2, before anything loads."""

from __future__ import annotations

import pytest

from conceptlens.cli import build_parser, main
from conceptlens.handlers.errors import InvalidInput
from conceptlens.server.cli import build_config


def _config(*argv: str):
    argv = ["serve", *argv]
    return build_config(build_parser(argv).parse_args(argv))


def test_valid_arguments_build_a_frozen_config(tmp_path):
    token = tmp_path / "token"
    token.write_text("abc\n")
    cfg = _config("--models", str(tmp_path), "--port", "0", "--metrics-port", "9100", "--token-file", str(token),
                  "--threads", "2", "--max-batch", "8", "--max-delay-ms", "2")
    assert (cfg.port, cfg.metrics_port, cfg.token, cfg.threads) == (0, 9100, "abc", 2)
    assert (cfg.predict.max_batch, cfg.predict.max_delay_s) == (8, 0.002)
    with pytest.raises(AttributeError):
        cfg.port = 1


@pytest.mark.parametrize(("extra", "message"), [
    (["--port", "70000"], "--port: must be a port number"),
    (["--tls-cert", "c.pem"], "--tls-cert/--tls-key: give both or neither"),
    (["--tls-client-ca", "ca.pem"], "--tls-client-ca: needs --tls-cert"),
    (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "--tls-cert: no such file"),
    (["--max-batch", "0"], "--max-batch >= 1"),
    (["--probe-workers", "-1"], "--probe-workers must be >= 0"),
])
def test_bad_arguments(tmp_path, extra, message):
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
        _config("--models", str(tmp_path), *extra)


def test_missing_repository_is_one_line_exit_2(tmp_path, capsys):
    assert main(["serve", "--models", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--models:" in err and "is not a directory" in err
