"""Issue 29, items 8 and 9 and the small ones about names: seeds and --config values, names that are not
UTF-8, newlines in names, NFC/NFD twins, folders skipped without a word.

Data here are a few tiny generated PNGs; nothing is trained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from pathlib import Path

import pytest

from ursa.cli import main
from ursa.errors import DataError
from ursa.training.config import SEED_MAX, ConfigError, TrainConfig
from ursa.util.names import printable
from ursa.vision.data import from_csv, from_folder, is_valid_split, read_split, split_settings
from ursa.vision.show import summary_lines
from tests.conftest import make_image


def raw(name: bytes) -> str:
    """A name as Python sees one that is not UTF-8 on disk (surrogate-escaped)."""
    return os.fsdecode(name)


def _folder(root: Path, classes: list[str], per_class: int = 6) -> Path:
    for ci, c in enumerate(classes):
        for i in range(per_class):
            make_image(root / c / raw(b"im\xff%d.png" % i), color=(40 * ci, 30 * i, 90), size=(40, 36))
    return root


@pytest.fixture
def odd_names(tmp_path) -> Path:
    """Three classes: one not UTF-8 ("caf\\xe9" in Latin-1), one with a newline, one plain; file names not UTF-8 either."""
    return _folder(tmp_path / "data", [raw(b"caf\xe9"), "ok\nline", "bear"])


# item 8: seeds and --config values

@pytest.mark.parametrize("kw, option", [
    ({"seed": -1}, "--seed"), ({"seed": 10**24}, "--seed"), ({"seed": SEED_MAX + 1}, "--seed"),
    ({"split_seed": -3}, "--split-seed"), ({"seed": True}, "--seed"),
    ({"unfreeze_lr": 5}, "--unfreeze-lr"), ({"cache": "false"}, "--cache"), ({"pretrained": 1}, "--pretrained"),
    ({"curve": "yes"}, "--curve"), ({"bs": True}, "--bs"), ({"out": 5}, "--out"), ({"csv": []}, "--csv"),
    ({"arch": [[[[[[[[1]]]]]]]]}, "--arch"), ({"size": 64.0}, "--size"), ({"valid_pct": 10**400}, "--valid-pct"),
])
def test_every_train_config_field_is_checked(kw, option):
    with pytest.raises(ConfigError) as e:
        TrainConfig(data="x", **kw)
    msg = str(e.value)
    assert msg.startswith(f"{option}: expected") and ", got " in msg and len(msg) < 200 and "\n" not in msg


def test_the_largest_seed_and_zero_are_fine():
    assert TrainConfig(data="x", seed=SEED_MAX, split_seed=0).split_seed_used == 0


@pytest.mark.parametrize("argv", [["--seed", "-1"], ["--seed", "1234567890123456789012345"]])
@pytest.mark.parametrize("command", ["train", "curve", "show"])
def test_a_bad_seed_is_one_line_on_every_command(tmp_path, capsys, command, argv):
    data = _folder(tmp_path / "d", ["a", "b"])
    out = ["--out", str(tmp_path / "o")]
    assert main([command, str(data), *argv, *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seed: expected a whole number from 0 to" in err[0]


def test_a_bad_seed_under_nproc_is_one_line_before_torchrun_starts(tmp_path, capsys):
    data = _folder(tmp_path / "d", ["a", "b"])
    assert main(["train", str(data), "--seed", "-1", "--nproc", "2", "--out", str(tmp_path / "o")]) == 2
    out = capsys.readouterr()
    assert len(out.err.strip().splitlines()) == 1 and "starting:" not in out.err and "--seed: expected" in out.err


@pytest.mark.parametrize("config", [
    {"unfreeze_lr": 5}, {"cache": "false"}, {"seed": -1}, {"seed": 10**25}, {"dedupe_split": "false"},
    {"seed": json.loads("[" * 200 + "]" * 200)},
])
def test_a_bad_config_file_is_one_line(tmp_path, capsys, config):
    data = _folder(tmp_path / "d", ["a", "b"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config))
    assert main(["show", str(data), "--config", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected" in err[0]


def test_a_config_file_nested_too_deep_is_one_line(tmp_path, capsys):
    data = _folder(tmp_path / "d", ["a", "b"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"seed": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert main(["show", str(data), "--config", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nested too deep" in err[0]


def test_a_model_files_split_settings_are_checked():
    assert split_settings({"seed": 7}) == (0.2, 7)
    for bad in ({"seed": -1}, {"split_seed": "x"}, {"valid_pct": 3}):
        with pytest.raises(DataError, match="expected"):
            split_settings(bad)


# item 9: names that are not UTF-8

def test_the_split_hash_takes_any_name_and_is_unchanged_for_utf8():
    for name in ("grizzly/1.jpg", "café/ü.png"):  # the bytes hashed are the UTF-8 bytes, as before
        h = hashlib.sha256(f"42:{name}".encode("utf-8")).digest()
        assert is_valid_split(name, 0.2, 42) == (int.from_bytes(h[:8], "big") / 2**64 < 0.2)
    assert is_valid_split(raw(b"caf\xe9/im\xff.png"), 0.2, 42) in (True, False)


def test_a_folder_of_names_not_utf8_loads_and_its_split_round_trips(odd_names, tmp_path):
    ds = from_folder(odd_names, 0.3, 1)
    assert raw(b"caf\xe9") in ds.classes and len(ds) == 18
    ds.write_split(tmp_path / "split.csv")
    rows = read_split(tmp_path / "split.csv")
    assert [r[0] for r in rows] == [ds.rel(i) for i in range(len(ds))]
    assert all((odd_names / r[0]).is_file() for r in rows)  # the names are the files' own bytes
    csv_file = tmp_path / "labels.csv"
    csv_file.write_bytes((tmp_path / "split.csv").read_bytes())
    assert from_csv(odd_names, csv_file).classes == ds.classes


def test_names_print_on_one_line_with_visible_escapes(odd_names):
    lines = summary_lines(from_folder(odd_names, 0.3, 1))
    assert len(lines) == 2 + 3
    assert any(line.startswith("caf\\xe9 ") for line in lines) and any(line.startswith("ok\\nline ") for line in lines)
    assert printable("tab\there\x1b\u2028") == "tab\\there\\x1b\\u2028" and printable("café") == "café"


def test_the_console_writes_any_name_the_cli_prints():
    from ursa.util.names import ERRORS

    assert (raw(b"caf\xe9") + " 中").encode("utf-8", ERRORS) == "caf\\xe9 中".encode()
    assert (raw(b"caf\xe9") + " 中").encode("latin-1", ERRORS) == b"caf\\xe9 \\u4e2d"  # a narrow console too


def test_verify_and_show_run_on_names_not_utf8(odd_names, tmp_path, capsys):
    assert main(["verify", str(odd_names)]) == 0
    out = capsys.readouterr()
    report = (odd_names / "verify.csv").read_bytes().splitlines()
    assert len(report) == 1 + 18  # complete: a row per image, none lost to a crash half-way
    assert "caf\\xe9" in out.out + out.err and "\udce9" not in out.out + out.err
    assert main(["show", str(odd_names), "--out", str(tmp_path / "batch.png"), "--size", "32"]) == 0
    assert (tmp_path / "batch.png").is_file()
    out = capsys.readouterr().out
    assert "ok\\nline" in out and "\nline " not in out


# small: NFC and NFD twins, folders skipped without a word

def test_nfc_and_nfd_twins_are_refused_in_one_line(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    data = _folder(tmp_path / "d", [nfc, nfd, "bear"], per_class=3)
    if len({p.name for p in data.iterdir()}) < 3:
        pytest.skip("this file system normalises names itself (one folder)")
    with pytest.raises(DataError, match="two Unicode forms") as e:
        from_folder(data)
    assert "\n" not in str(e.value)


def test_skipped_folders_are_said_once(tmp_path, caplog):
    data = _folder(tmp_path / "d", ["a", "b", "_quarantine", ".hidden", "_notes"], per_class=3)
    with caplog.at_level(logging.WARNING, logger="ursa"):
        ds = from_folder(data)
    assert ds.classes == ["a", "b"]
    said = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(said) == 1 and all(n in said[0] for n in ("_quarantine (ursa's quarantine)", ".hidden (hidden)", "_notes"))


def test_verify_never_quarantines_into_a_users_folder_named_quarantine(tmp_path, capsys):
    data = _folder(tmp_path / "d", ["a", "b", "_quarantine"], per_class=2)
    (data / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    before = sorted(p.name for p in (data / "_quarantine").iterdir())
    assert main(["verify", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "_quarantine" in err[0] and "rename it" in err[0]
    assert sorted(p.name for p in (data / "_quarantine").iterdir()) == before and (data / "a" / "broken.png").exists()
    (data / "_quarantine").rename(data / "kept")
    assert main(["verify", str(data)]) == 0  # verify's own quarantine: made, marked, used again on the next run
    assert (data / "_quarantine" / ".ursa-quarantine").exists() and not (data / "a" / "broken.png").exists()
    assert main(["verify", str(data)]) == 0


def test_html_pages_show_names_with_visible_escapes_through_one_function():
    from ursa.diagnose import explore, insight_html, report
    from ursa.util.names import html_text

    assert report._e is insight_html._e is explore._e is html_text
    assert html_text(raw(b"caf\xe9") + "<b>\x1b") == "caf\\xe9&lt;b&gt;\\x1b"  # encodable as UTF-8, every byte visible
    html_text(raw(b"caf\xe9")).encode("utf-8")


def test_the_cleaners_log_and_cleaned_csv_take_names_not_utf8(odd_names):
    from ursa.apps import clean

    ds = from_folder(odd_names, 0.3, 1)
    names = [ds.rel(i) for i in range(len(ds))]
    labels = [ds.classes[i] for i in ds.labels]
    d = clean.Decisions(odd_names, names, labels, ds.classes)
    odd = [i for i, n in enumerate(names) if not n.startswith("bear/")]
    d.decide(names[odd[0]], "relabel", "bear")
    d.decide(names[odd[1]], "exclude")
    again = clean.Decisions(odd_names, names, labels, ds.classes)
    assert again.load() == 2  # the log replays, names intact
    assert again.label_of(names[odd[0]]) == "bear" and again.label_of(names[odd[1]]) is None
    cleaned = from_csv(odd_names, odd_names / "cleaned.csv")  # and trains: every name is a file on disk
    assert len(cleaned) == len(ds) - 1
