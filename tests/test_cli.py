"""`ppml ... --help`: every option of every sub-command states its default exactly once."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("timm")

from ppml.cli import main  # noqa: E402

SUBCOMMANDS = ("train", "encrypt", "decrypt", "show", "attack", "detect train", "detect eval")
# Options a command cannot run without: no default to state.
REQUIRED = {("decrypt", "--keys"), ("show", "--out"), ("attack", "--scheme"), ("detect eval", "--out")}


def _help_entries(command: str, capsys, monkeypatch) -> dict[str, str]:
    """{first option string (or positional name): its help text on one line} from ``ppml COMMAND --help``."""
    monkeypatch.setenv("COLUMNS", "160")
    with pytest.raises(SystemExit) as exc:
        main([*command.split(), "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln in ("positional arguments:", "options:"))
    entries, name = {}, None
    for ln in lines[start:]:
        m = re.match(r"^  (\S.*?)(?: {2,}(.*))?$", ln)
        if m:  # an option line: flags, metavar, maybe the start of the help
            name = m.group(1).split()[0].rstrip(",")
            entries[name] = m.group(2) or ""
        elif name is not None and re.match(r"^ {3,}\S", ln):
            entries[name] = f"{entries[name]} {ln.strip()}".strip()
        else:
            name = None
    assert entries, text
    return entries


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_option_states_its_default_once(command, capsys, monkeypatch):
    entries = _help_entries(command, capsys, monkeypatch)
    for name, help_text in entries.items():
        if name == "-h":
            continue
        # ArgumentDefaultsHelpFormatter on top of a hand-written default gave "(default: OS entropy) (default: None)"
        assert help_text.count("(default") <= 1 and help_text.count("default:") <= 1, (name, help_text)
        assert "(default: None)" not in help_text, (name, help_text)  # a None default says what it means
        if name.startswith("-") and (command, name) not in REQUIRED:
            assert "default" in help_text.lower(), (name, help_text)


def test_named_options_show_their_defaults(capsys, monkeypatch):
    from ppml.train import TrainConfig

    d = TrainConfig()
    train = _help_entries("train", capsys, monkeypatch)
    assert train["--epochs"] == f"(default: {d.epochs})" and train["--img-size"] == f"(default: {d.img_size})"
    assert train["--key-seed"].endswith("(default: OS entropy)") and train["--resume"].endswith("(default: off)")
    assert train["--depth"].endswith("(default: the model's own)")
    assert train["--compile"].endswith("(default: off)")
    assert _help_entries("encrypt", capsys, monkeypatch)["--scheme"] == "(default: rs)"
    attack = _help_entries("attack", capsys, monkeypatch)
    assert "default" not in attack["--scheme"]  # required
    assert attack["--patch-size"].endswith("(default: 16)") and "(default: none" in attack["--out"]
    detect = _help_entries("detect train", capsys, monkeypatch)
    assert detect["--epochs"] == "(default: 10 on the built-in data, 150 on a COCO folder)"
    assert detect["--stop-after"].endswith("(default: run to the end)")
