"""ursa search against local fakes of Openverse and Wikimedia Commons (tests/search_fakes.py), then download and
credits: the URL lists and licence columns come out right, and no fault of a provider aborts the run. No network."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from ursa.acquire.addresses import AddressPolicy
from ursa.acquire.credits import MARK, write_credits
from ursa.acquire.download import download_images
from ursa.acquire.licenses import license_code, license_summary, parse_license_filter
from ursa.acquire.manifest import LEGACY_COLUMNS, MANIFEST_COLUMNS, read_manifest
from ursa.acquire.providers import Commons, Openverse, Pexels
from ursa.acquire.search import search_images
from ursa.acquire.urls import SEARCH_COLUMNS
from ursa.acquire.verify import verify_images
from ursa.cli import main

try:
    from tests.fault_server import make_images
    from tests.search_fakes import FakeSearch
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from fault_server import make_images
    from search_fakes import FakeSearch

# The fakes listen on 127.0.0.2, allowed here alone: loopback (127.0.0.1) and private networks stay refused.
POLICY = AddressPolicy.build(allow=["127.0.0.2/32"])
FAST = dict(timeout=2.0, retries=2, backoff=0.01, max_retry_after=2.0, address_policy=POLICY)


def _endpoints(fake: FakeSearch) -> list[str]:
    return [f"openverse={fake.openverse}", f"commons={fake.commons}"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == SEARCH_COLUMNS
        return list(reader)


def test_both_providers_paged_rate_limit_honoured_500_and_private_results(tmp_path):
    faults = {("openverse", 2): "ratelimit", ("commons", 2): "error500"}
    with FakeSearch(total=120, faults=faults, private={"openverse": {1}, "commons": {2}}) as fake:
        s = search_images("grizzly bear", "grizzly", 100, endpoint=_endpoints(fake), out=tmp_path / "g.csv", **FAST)
        hits, times, port = dict(fake.hits), dict(fake.times), fake.port
    rows = _rows(tmp_path / "g.csv")
    assert len(rows) == len(s.results) == 100
    runs = {r.name: r for r in s.runs}
    # Openverse: 20 a page; page 2 answered 429 once (Retry-After: 1), was asked again a second later, paging went on.
    assert hits[("openverse", 2)] == 2 and times[("openverse", 2)][1] - times[("openverse", 2)][0] >= 0.9
    assert runs["openverse"].error == "" and runs["openverse"].pages == 6 and len(runs["openverse"].kept) >= 100
    # Commons: page 2 answered 500 on every try (1 + 2 retries): its page-1 results are kept, the reason recorded.
    assert hits[("commons", 2)] == 3 and ("commons", 3) not in hits
    assert runs["commons"].error.startswith("http_500") and len(runs["commons"].kept) == 49
    # One result of each pointed at 10.0.0.7: dropped and counted, never written.
    assert s.dropped_address == 2 and runs["openverse"].dropped["address"] == 1
    assert not any("10.0.0.7" in r["url"] for r in rows)
    # Interleaved, in each provider's rank order (Commons sent its page reversed: "index" is the rank).
    assert [r["provider"] for r in rows[:4]] == ["openverse", "commons"] * 2
    assert rows[0] == {"url": f"http://127.0.0.2:{port}/img/openverse_0.jpg",
                       "source_page": "https://www.flickr.com/photos/someone/0", "creator": "Photographer 0",
                       "license": "CC BY 2.0", "license_url": "https://creativecommons.org/licenses/by/2.0/",
                       "provider": "openverse"}
    assert rows[1] == {"url": f"http://127.0.0.2:{port}/img/commons_0.jpg",  # the 1024 px thumbnail
                       "source_page": "https://commons.wikimedia.org/wiki/File:Grizzly_bear_0.jpg",
                       "creator": "User & 0",  # Artist's HTML link as plain text
                       "license": "CC BY-SA 4.0", "license_url": "https://creativecommons.org/licenses/by-sa/4.0",
                       "provider": "commons"}
    assert rows[3]["license"] == "CC0" and rows[5]["url"].endswith("commons_3.jpg")  # commons_2 was the private one
    assert "1 address" in s.format() and "stopped: http_500" in s.format()


@pytest.mark.parametrize("faults, reasons", [
    ({("openverse", 2): "malformed", ("commons", 1): "apierror"},
     {"openverse": "malformed answer: not JSON", "commons": "the API said internal_api_error_DBQueryError"}),
    ({("openverse", 1): "wrongshape", ("commons", 2): "malformed"},
     {"openverse": "not the documented shape: expected a list at 'results'", "commons": "malformed answer"}),
])
def test_a_bad_answer_ends_only_that_providers_paging(tmp_path, faults, reasons):
    with FakeSearch(total=120, faults=faults) as fake:
        s = search_images("bears", "bear", 200, endpoint=_endpoints(fake), out=tmp_path / "b.csv", **FAST)
    runs = {r.name: r for r in s.runs}
    for name, why in reasons.items():
        assert runs[name].error.startswith(why), runs[name].error
    kept = {r.name: len(r.kept) for r in s.runs}
    assert kept == ({"openverse": 20, "commons": 0} if ("commons", 1) in faults else {"openverse": 0, "commons": 50})
    assert len(_rows(tmp_path / "b.csv")) == sum(kept.values())


def test_license_filter_keeps_only_the_codes_asked(tmp_path):
    with FakeSearch(total=40) as fake:
        s = search_images("bears", "bear", 200, endpoint=_endpoints(fake), licenses="cc0,by", out=tmp_path / "b.csv",
                          **FAST)
    rows = _rows(tmp_path / "b.csv")
    assert rows and {license_code(r["license"], r["license_url"]) for r in rows} == {"cc0", "by"}
    assert all(r.dropped["license"] > 0 for r in s.runs)
    url, _ = Openverse().request("http://x/", "bears", 1, parse_license_filter("CC0, by"))
    assert "license=by%2Ccc0" in url  # asked of Openverse too
    url, _ = Openverse().request("http://x/", "bears", 1, parse_license_filter("pexels-license"))
    assert "license=" not in url  # a code Openverse does not know is filtered here only


@pytest.mark.parametrize("given, code", [
    ("CC BY-SA 4.0", "by-sa"), ("by", "by"), ("CC0", "cc0"), ("CC0 1.0", "cc0"), ("Public domain", "pdm"),
    ("CC BY 2.0", "by"), ("CC BY-SA 2.0 de", "by-sa"), ("cc-by-nc-nd-4.0", "by-nc-nd"), ("Pexels License", "pexels-license"),
])
def test_license_codes(given, code):
    assert license_code(given) == code


def test_license_code_from_url_alone():
    assert license_code("", "https://creativecommons.org/publicdomain/zero/1.0/") == "cc0"
    assert license_code("", "https://creativecommons.org/licenses/by-nc/2.0/") == "by-nc"
    assert license_code("", "") == ""


def test_cli_search_env_endpoints_and_files_it_did_not_write(tmp_path, monkeypatch, capsys):
    out = tmp_path / "urls_grizzly.csv"
    with FakeSearch(host="127.0.0.1", total=30) as fake:
        monkeypatch.setenv("URSA_OPENVERSE_ENDPOINT", fake.openverse)
        monkeypatch.setenv("URSA_COMMONS_ENDPOINT", fake.commons)
        args = ["search", "grizzly bear", "--class", "grizzly", "-n", "25", "--out", str(out), "--timeout", "2"]
        # A fake on this machine is refused like any private address: nothing asked, nothing written, exit 1.
        assert main(args) == 1
        assert not out.exists() and sum(fake.hits.values()) == 0
        assert "refused: 127.0.0.1 is a loopback address" in capsys.readouterr().out
        assert main([*args, "--allow-private"]) == 0
        assert "Wrote 25 new URLs" in capsys.readouterr().out
        hits = sum(fake.hits.values())
        assert main([*args, "--allow-private", "--json"]) == 0  # again: the list already has its 25
        summary = json.loads(capsys.readouterr().out)
        assert summary["total"] == 25 and summary["results"] == 0 and sum(fake.hits.values()) == hits
        assert main([*args[:5], "40", *args[6:], "--allow-private"]) == 0  # a higher -n continues the list
        rows = _rows(out)
        assert len(rows) == 40 and len({r["url"] for r in rows}) == 40
        mine = tmp_path / "urls_teddy.csv"
        mine.write_text("https://example.com/1.jpg\n")
        assert main(["search", "teddy", "--out", str(mine), "--allow-private"]) == 2
        assert mine.read_text() == "https://example.com/1.jpg\n"  # a user's file is never rewritten
    err = capsys.readouterr().err
    assert "was not written by `ursa search`" in err and "Traceback" not in err
    monkeypatch.delenv("PEXELS_API_KEY", raising=False)
    for bad, words in ((["--provider", "pexels"], "PEXELS_API_KEY"), (["--provider", "bing"], "unknown"),
                       (["--endpoint", "http://127.0.0.1:9/"], "NAME=URL"), (["-n", "0"], "-n of at least 1")):
        assert main(["search", "bears", *bad]) == 2
        assert words in capsys.readouterr().err


def test_pexels_shape_and_key_header(monkeypatch):
    monkeypatch.setenv("PEXELS_API_KEY", "k123")
    url, headers = Pexels().request(Pexels.base_url, "grizzly bear", 2, frozenset())
    assert url == "https://api.pexels.com/v1/search?query=grizzly+bear&per_page=80&page=2"
    assert headers == {"Authorization": "k123"}
    body = {"page": 2, "per_page": 80, "next_page": "https://api.pexels.com/v1/search/?page=3",
            "photos": [{"id": 1, "url": "https://www.pexels.com/photo/1/", "photographer": "A B",
                        "src": {"original": "https://images.pexels.com/1.jpeg", "large2x": "https://images.pexels.com/1l.jpeg"}},
                       {"id": 2, "src": "broken"}]}
    page = Pexels().parse(body, 2)
    assert page.next == 3 and [f.url for f in page.results] == ["https://images.pexels.com/1l.jpeg"]
    assert page.results[0].license == "Pexels License" and page.results[0].creator == "A B"
    assert Commons().parse({"batchcomplete": True}, 0).results == []  # no "query": the search found nothing


def test_download_carries_credits_and_credits_lists_only_kept_images(tmp_path, capsys):
    with FakeSearch(total=10) as fake:
        search_images("grizzly bear", "grizzly", 20, endpoint=_endpoints(fake), out=tmp_path / "urls_grizzly.csv", **FAST)
        dest = tmp_path / "data"
        s = download_images([str(tmp_path / "urls_grizzly.csv")], dest, address_policy=POLICY, progress=False,
                            licenses="by,by-sa,cc0,pdm")
    assert s.filtered == 2 and s.saved == 18  # the two CC BY-NC results were not fetched
    rows = {r["file"]: r for r in read_manifest(dest / "downloads.csv")}
    assert (dest / "downloads.csv").read_text().splitlines()[0] == ",".join(MANIFEST_COLUMNS)
    assert all(r["license"] and r["provider"] and r["source_page"] for r in rows.values())
    files = sorted(rows)
    # verify quarantines one (cut short after the download), clean excludes another, one is copied in by hand.
    broken = dest / files[0]
    broken.write_bytes(broken.read_bytes()[:200])
    assert verify_images(dest, workers=1, progress=False).quarantined == 1
    assert not broken.exists() and (dest / "_quarantine" / files[0]).exists()
    kept = files[2:]
    (dest / "cleaned.csv").write_text("name,label\n" + "".join(f"{f},grizzly\n" for f in kept) + "grizzly/mine.jpg,grizzly\n")
    (dest / "grizzly" / "mine.jpg").write_bytes(make_images(41)["40.jpg"])  # not one of the fake's 20 pictures
    summary = write_credits(dest)
    text = (dest / "CREDITS.md").read_text()
    assert text.startswith(MARK) and summary.images == len(kept) + 1
    for f in kept:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {f} |"))
        r = rows[f]
        assert f"]({r['source_page']})" in line and r["creator"] in line and r["license"] in line
        assert f"[{r['license']}]({r['license_url']})" in line if r["license_url"] else f"| {r['license']} |" in line
    assert files[0] not in text and files[1] not in text
    assert "| grizzly/mine.jpg |  | unknown (no row in downloads.csv) |" in text
    assert summary.by_license["unknown"] == 1
    # The licence summary the model file and the report carry, from the same records.
    assert license_summary([dest / f for f in kept], dest) == {
        "images": len(kept), "unknown": 0, "by_license": {k: n for k, n in summary.by_license.items() if k != "unknown"}}
    assert main(["credits", str(dest)]) == 0  # its own file is rewritten
    (dest / "CREDITS.md").write_text("# my notes\n")
    assert main(["credits", str(dest)]) == 2 and (dest / "CREDITS.md").read_text() == "# my notes\n"
    assert "was not written by `ursa credits`" in capsys.readouterr().err


def test_a_manifest_from_before_the_credit_columns_is_read_and_upgraded(tmp_path):
    with FakeSearch(total=3) as fake:
        search_images("bears", "c", 3, endpoint=[f"openverse={fake.openverse}"], providers=["openverse"],
                      out=tmp_path / "urls_c.csv", **FAST)
        first = _rows(tmp_path / "urls_c.csv")[0]
        dest = tmp_path / "d"
        (dest / "c").mkdir(parents=True)
        (dest / "downloads.csv").write_text(",".join(LEGACY_COLUMNS) + "\n" +
                                            f"{first['url']},c,,refused,,refused: x,,\n")  # an older ursa's row
        assert read_manifest(dest / "downloads.csv")[0]["license"] == ""
        s = download_images([str(tmp_path / "urls_c.csv")], dest, address_policy=POLICY, progress=False)
    assert s.saved == 3  # the refused row is tried again (its address may be allowed now): it is
    assert (dest / "downloads.csv").read_text().splitlines()[0] == ",".join(MANIFEST_COLUMNS)
    assert {r["license"] for r in read_manifest(dest / "downloads.csv")} == {"CC BY 2.0", "CC0 1.0", "CC BY-SA 4.0"}


def _header(**extra: str) -> dict[str, str]:
    head = {"format": "ursa.model", "format_version": "1", "arch": "efficientnet_lite0", "classes": '["a", "b"]',
            "input_size": "64", "mean": "[0.5, 0.5, 0.5]", "std": "[0.2, 0.2, 0.2]",
            "head": '{"n_features": 8, "n_classes": 2}'}
    return {**head, **extra}


def test_licenses_metadata_field_is_optional_and_checked():
    from ursa.errors import ModelFileError
    from ursa.inference.metaschema import ModelMeta

    assert ModelMeta.from_header(_header(), Path("old.safetensors"), buildable=False).licenses == {}  # older files load
    good = {"images": 3, "unknown": 1, "by_license": {"CC BY": 2}}
    meta = ModelMeta.from_header(_header(licenses=json.dumps(good)), Path("m"), buildable=False)
    assert meta.licenses == good and json.loads(meta.to_header()["licenses"]) == good
    for bad, field in (({"images": 3, "unknown": -1, "by_license": {}}, "licenses.unknown"),
                       ({"images": 3, "unknown": 0, "by_license": {"CC BY": "2"}}, "licenses.by_license['CC BY']"),
                       ([1], "licenses")):
        with pytest.raises(ModelFileError, match=re.escape(f"field {field!r}")):
            ModelMeta.from_header(_header(licenses=json.dumps(bad)), Path("m"), buildable=False)


def test_training_run_summarises_the_licences_in_the_model_file_and_report(sample_copy, tmp_path, one_thread):
    from ursa.inference.header import read_meta
    from ursa.training.config import TrainConfig
    from ursa.training.recipe import train

    files = sorted(p.relative_to(sample_copy).as_posix() for p in sample_copy.glob("*/*.jpg"))
    licences = ["CC BY 2.0", "CC0 1.0", "CC BY-SA 4.0"]
    rows = [[f"https://img.example/{i}.jpg", f.split("/")[0], f, "saved", "200", "", "1", "0" * 64,
             f"https://example.org/{i}", f"Someone {i}", licences[i % 3], "", "openverse"]
            for i, f in enumerate(files) if i % 4]  # every 4th image has no row: its licence is unknown
    (sample_copy / "downloads.csv").write_text(
        "\n".join(",".join(r) for r in [list(MANIFEST_COLUMNS), *rows]) + "\n")
    out = tmp_path / "run"
    train(TrainConfig(data=sample_copy, out=out, epochs=1, unfreeze_epochs=0, size=64, quiet=True))
    lic = read_meta(out / "model.safetensors", buildable=False).licenses
    by = {"CC BY": sum(1 for r in rows if r[10] == "CC BY 2.0"), "CC0": sum(1 for r in rows if r[10] == "CC0 1.0"),
          "CC BY-SA": sum(1 for r in rows if r[10] == "CC BY-SA 4.0")}
    assert lic["images"] == len(files) and lic["unknown"] == len(files) - len(rows) and lic["by_license"] == by
    info = json.loads((out / "report.json").read_text())["info"]
    assert info["licences"].startswith(f"{len(files)} images: ") and f"unknown {len(files) - len(rows)}" in info["licences"]
    assert "CC BY-SA" in (out / "report.html").read_text()


def test_a_provider_that_breaks_unexpectedly_loses_only_its_own_results(tmp_path, monkeypatch):
    def boom(self, body, cursor):
        raise RecursionError("nested too deep")

    monkeypatch.setattr(Commons, "parse", boom)
    with FakeSearch(total=30) as fake:
        s = search_images("bears", "bear", 40, endpoint=_endpoints(fake), out=tmp_path / "b.csv", **FAST)
    runs = {r.name: r for r in s.runs}
    assert runs["commons"].error.startswith("unexpected: RecursionError") and not runs["commons"].kept
    assert len(_rows(tmp_path / "b.csv")) == 30 and not runs["openverse"].error


def test_rows_saved_from_a_plain_list_take_the_credits_of_a_later_search_list(tmp_path):
    with FakeSearch(total=4) as fake:
        search_images("bears", "c", 4, providers="openverse", endpoint=fake.openverse, out=tmp_path / "urls_c.csv",
                      **FAST)
        rows = _rows(tmp_path / "urls_c.csv")
        (tmp_path / "plain.txt").write_text("".join(r["url"] + "\n" for r in rows))
        dest = tmp_path / "d"
        assert download_images({"c": tmp_path / "plain.txt"}, dest, address_policy=POLICY, progress=False).saved == 4
        assert {r["license"] for r in read_manifest(dest / "downloads.csv")} == {""}
        again = download_images([str(tmp_path / "urls_c.csv")], dest, address_policy=POLICY, progress=False)
    assert again.skipped == 4 and again.saved == 0  # nothing fetched again
    by_url = {r["url"]: r for r in read_manifest(dest / "downloads.csv")}
    assert all(by_url[r["url"]]["license"] == r["license"] and by_url[r["url"]]["creator"] == r["creator"] for r in rows)
