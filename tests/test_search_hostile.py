"""ursa search, download's credit columns and ursa credits against hostile answers, odd licence spellings and
odd output paths: each test here failed before the fix it names (review of issue 27's search half). No network."""

from __future__ import annotations

import csv
import os
import shutil
import signal

import pytest

from ursa.acquire.credits import write_credits
from ursa.acquire.download import download_images
from ursa.acquire.licenses import license_code, license_summary
from ursa.acquire.manifest import read_manifest
from ursa.acquire.search import search_images
from ursa.cli import main
from ursa.errors import BusyError
from ursa.util.lock import FolderLock

try:
    from tests.search_fakes import FakeSearch
    from tests.test_search import FAST, POLICY, _endpoints, _rows
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from search_fakes import FakeSearch
    from test_search import FAST, POLICY, _endpoints, _rows


def test_json_nested_too_deep_is_a_malformed_answer_and_a_repeated_page_ends_paging(tmp_path):
    # Before: "unexpected: RecursionError ... (please report it)", and 20 pages asked of a provider that
    # answered page 1 again and again.
    faults = {("commons", 1): "nested", **{("openverse", p): "repeat" for p in range(2, 21)}}
    with FakeSearch(total=400, faults=faults) as fake:
        s = search_images("bears", "bear", 100, endpoint=_endpoints(fake), out=tmp_path / "b.csv", **FAST)
        hits = dict(fake.hits)
    runs = {r.name: r for r in s.runs}
    assert runs["commons"].error == "malformed answer: JSON nested too deeply to be a search answer"
    assert runs["openverse"].error.startswith("page 2 repeated results") and runs["openverse"].pages == 2
    assert sum(n for (name, _), n in hits.items() if name == "openverse") == 2
    assert len(_rows(tmp_path / "b.csv")) == 20  # page 1's results are kept


def test_a_redirect_to_a_malformed_address_ends_that_provider_at_once_as_a_bad_url(tmp_path):
    # The download fetcher's typed check (not httpx's wording) on the search client too: not retried as "connection".
    with FakeSearch(total=40, faults={("commons", 1): "badredirect"}) as fake:
        s = search_images("bears", "bear", 20, endpoint=_endpoints(fake), out=tmp_path / "b.csv", **FAST)
        hits = dict(fake.hits)
    runs = {r.name: r for r in s.runs}
    assert "malformed redirect target" in runs["commons"].error and "connection" not in runs["commons"].error
    assert hits[("commons", 1)] == 1  # asked once: asking again will not help
    assert not runs["openverse"].error and len(_rows(tmp_path / "b.csv")) == 20


def test_a_second_search_on_the_same_list_is_refused_not_raced(tmp_path):
    out = tmp_path / "urls_bear.csv"
    with FakeSearch(total=10) as fake:
        search_images("bears", "bear", 5, endpoint=_endpoints(fake), out=out, **FAST)
        before = out.read_bytes()
        with FolderLock(tmp_path, f".{out.name}.lock", "folder of the URL list"):  # another search holds the list
            with pytest.raises(BusyError, match="another ursa process"):
                search_images("bears", "bear", 10, endpoint=_endpoints(fake), out=out, **FAST)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the lock file is gone again


def test_an_output_that_is_a_folder_or_cannot_be_written_is_one_line_before_any_search(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine\n")
    with FakeSearch(host="127.0.0.1", total=10) as fake:
        base = ["search", "bears", "-n", "5", "--provider", "openverse", "--endpoint", fake.openverse,
                "--allow-private", "--quiet"]
        assert main([*base, "--out", str(tmp_path)]) == 2  # before: IsADirectoryError's traceback
        assert "is not a file" in capsys.readouterr().err
        assert main([*base, "--out", str(tmp_path / "afile" / "urls.csv")]) == 2  # before: searched, then a traceback
        assert "cannot create" in capsys.readouterr().err
        assert sum(fake.hits.values()) == 0
    assert (tmp_path / "afile").read_text() == "mine\n"
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (data / "downloads.csv").write_text("url,class,file,status,http_status,error,bytes,sha256\n")
    with pytest.raises(Exception, match="not written by `ursa credits`"):  # before: IsADirectoryError
        write_credits(data, out=data / "a")


@pytest.mark.parametrize("given, code", [
    ("CC BY-SA 3.0 igo", "by-sa"), ("CC BY 4.0 International", "by"), ("cc-by-sa-2.5,2.0,1.0", "by-sa"),
    ("CC-BY-SA-3.0-migrated", "by-sa"), ("Creative Commons Attribution-Share Alike 4.0", "by-sa"),
    ("Creative Commons Attribution-NonCommercial-NoDerivatives 4.0 International", "by-nc-nd"),
    ("BY-SA 3.0 igo", "by-sa"), ("CC BY-NC 2.0", "by-nc"), ("GFDL", "gfdl"), ("Pexels License", "pexels-license"),
])
def test_licence_spellings_providers_use_reduce_to_one_code(given, code):
    assert license_code(given) == code


def test_a_name_that_is_no_cc_licence_takes_the_code_of_its_cc_deed():
    assert license_code("Flickr free", "https://creativecommons.org/publicdomain/zero/1.0/") == "cc0"
    assert license_code("GFDL", "") == "gfdl"


HOSTILE = '=HYPERLINK("http://evil/","x")\x1b[31m\u202e | [click](javascript:alert(1)) &lt;img src=x&gt;\x00'


def test_hostile_creator_text_stays_inert_in_the_list_downloads_csv_and_credits(tmp_path):
    out = tmp_path / "urls_bear.csv"
    with FakeSearch(total=3, creator=HOSTILE) as fake:
        search_images("bears", "bear", 3, providers="openverse", endpoint=fake.openverse, out=out, **FAST)
        dest = tmp_path / "d"
        assert download_images([str(out)], dest, address_policy=POLICY, progress=False).saved == 3
    text = out.read_text(encoding="utf-8")
    assert not any(c in text for c in "\x1b\u202e\x00")  # before: a terminal escape, a bidi override and NUL
    with open(out, newline="", encoding="utf-8") as f:
        cells = [r["creator"] for r in csv.DictReader(f)]
    assert all(c.startswith("'=HYPERLINK") for c in cells)  # a spreadsheet shows it as text, not a formula
    manifest = read_manifest(dest / "downloads.csv")
    with open(out, newline="", encoding="utf-8") as f:
        listed = {r["url"]: r["license"] for r in csv.DictReader(f)}
    assert {r["url"]: r["license"] for r in manifest} == listed  # before: the quotes shifted the columns
    creators = {r["creator"] for r in manifest}
    shown = '=HYPERLINK("http://evil/","x")\\x1b[31m\\u202e | [click](javascript:alert(1)) <img src=x>\\x00'
    assert creators == {shown}
    write_credits(dest)
    md = (dest / "CREDITS.md").read_text(encoding="utf-8")
    assert not any(c in md for c in "\x1b\u202e\x00")
    row = next(line for line in md.splitlines() if line.startswith("| bear/"))
    assert row.count(" | ") == 3  # the creator's pipe is escaped: still four cells
    assert "\\[click\\](javascript" in row and "\\<img" in row  # no link, no HTML


def test_an_image_moved_to_another_class_folder_keeps_its_credit(tmp_path):
    out = tmp_path / "urls_bear.csv"
    with FakeSearch(total=4) as fake:
        search_images("bears", "bear", 4, providers="openverse", endpoint=fake.openverse, out=out, **FAST)
        dest = tmp_path / "d"
        assert download_images([str(out)], dest, address_policy=POLICY, progress=False).saved == 4
    rows = {r["file"]: r for r in read_manifest(dest / "downloads.csv")}
    (dest / "black").mkdir()
    moved = dest / "black" / "renamed.jpg"
    shutil.move(dest / "bear" / "00000001.jpg", moved)  # the user files a mislabelled picture elsewhere
    s = write_credits(dest)
    assert s.images == 4 and "unknown" not in s.by_license  # before: the moved picture's licence was unknown
    md = (dest / "CREDITS.md").read_text(encoding="utf-8")
    assert f"| black/renamed.jpg | {rows['bear/00000001.jpg']['creator']} |" in md
    files = sorted(p for p in dest.rglob("*.jpg"))
    assert license_summary(files, dest)["unknown"] == 0


def test_a_provider_none_of_whose_licences_passes_the_filter_is_not_asked(tmp_path):
    # Before: Openverse was paged to its last page for --license gfdl (every result dropped); Pexels would be asked
    # 50 pages deep (of 200 calls an hour) for --license cc0.
    with FakeSearch(total=60) as fake:
        s = search_images("bears", "bear", 20, endpoint=_endpoints(fake), licenses="gfdl", out=tmp_path / "b.csv",
                          **FAST)
        hits = dict(fake.hits)
    runs = {r.name: r for r in s.runs}
    assert runs["openverse"].pages == 0 and not any(name == "openverse" for name, _ in hits)
    assert runs["openverse"].error.startswith("not asked: none of its licences (by, by-nc")
    assert runs["commons"].pages >= 1  # Commons files may be under any licence: asked


def test_credits_follow_cleaned_csv_labels_and_refuse_one_without_names(tmp_path, capsys):
    out = tmp_path / "urls_bear.csv"
    with FakeSearch(total=3) as fake:
        search_images("bears", "bear", 3, providers="openverse", endpoint=fake.openverse, out=out, **FAST)
        dest = tmp_path / "d"
        assert download_images([str(out)], dest, address_policy=POLICY, progress=False).saved == 3
    # The cleaner relabelled one picture (no file moved) and excluded another.
    (dest / "cleaned.csv").write_text("name,label\nbear/00000000.jpg,bear\nbear/00000001.jpg,black\n")
    s = write_credits(dest)
    assert dict(s.per_class) == {"bear": 1, "black": 1}  # before: both under "bear"
    md = (dest / "CREDITS.md").read_text(encoding="utf-8")
    assert md.index("## black (1)") < md.index("| bear/00000001.jpg |") and "bear/00000002.jpg" not in md
    # A cleaned.csv without a name column: one line, exit 2 (before: "Credited 0 images", exit 0).
    (dest / "cleaned.csv").write_text("file,label\nbear/00000000.jpg,bear\n")
    assert main(["credits", str(dest)]) == 2
    assert "no 'name' column" in capsys.readouterr().err


def test_api_calls_name_ursa_and_the_operators_contact_as_wikimedia_asks(tmp_path, monkeypatch):
    # Before: "Mozilla/5.0 (compatible; ursa-download/0.1; ...)", a browser-like agent with no contact.
    monkeypatch.setenv("URSA_CONTACT", "bears@example.org\r\nX-Injected: 1")
    with FakeSearch(total=5) as fake:
        search_images("bears", "bear", 5, endpoint=_endpoints(fake), out=tmp_path / "b.csv", **FAST)
        agents = set(fake.agents)
    assert len(agents) == 1
    agent = agents.pop()
    assert agent.startswith("ursa/") and "bears@example.org X-Injected: 1;" in agent and "Mozilla" not in agent


def test_a_password_in_an_endpoint_is_never_printed(tmp_path, capsys):
    # Before: --json printed "endpoint": "http://u:s3cret@..." and a malformed endpoint's error showed it too.
    with FakeSearch(host="127.0.0.1", total=5) as fake:
        base = fake.openverse.replace("http://", "http://u:s3cret@")
        args = ["search", "bears", "-n", "5", "--provider", "openverse", "--allow-private", "--quiet",
                "--out", str(tmp_path / "b.csv")]
        assert main([*args, "--endpoint", base, "--json"]) == 0
        assert main([*args, "--endpoint", base.replace(f":{fake.port}/", f":{fake.port}:99999/")]) == 2
    out, err = capsys.readouterr()
    assert "s3cret" not in out + err and '"endpoint": "http://***@127.0.0.1' in out


@pytest.mark.parametrize("given", ["cco", "ccby", "by,sa", "nc"])
def test_a_license_filter_with_a_mistyped_cc_code_is_refused_not_a_filter_nothing_passes(given, capsys):
    # Before: accepted, then every result dropped as "license" (search) or "not fetched" (download).
    args = ["search", "bears", "--license", given, "--provider", "openverse", "--endpoint", "http://127.0.0.1:9/"]
    assert main(args) == 2
    assert "is no Creative Commons code" in capsys.readouterr().err


def test_a_commons_file_openverse_also_gives_is_one_picture_not_two(tmp_path):
    # Openverse indexes Commons: its URL is the original file, Commons' the 1024 px thumbnail; the bytes differ, so
    # download's sha256 would keep both, one maybe in training and one in validation. Before: 10 rows, 5 pictures.
    with FakeSearch(total=10, wikimedia=True) as fake:
        s = search_images("bears", "bear", 10, endpoint=_endpoints(fake), out=tmp_path / "b.csv", **FAST)
    names = [r["url"].rsplit("/", 1)[1].removeprefix("1024px-") for r in _rows(tmp_path / "b.csv")]
    assert len(names) == 10 and len(set(names)) == 10
    assert sum(r.dropped["duplicate"] for r in s.runs) >= 5


def test_ctrl_c_mid_search_writes_the_pages_found_so_far_and_exits_130(tmp_path, capsys):
    # Before: the list was left as it was (consistent) but every result found until then was lost.
    out = tmp_path / "urls_bear.csv"
    with FakeSearch(host="127.0.0.1", total=120, faults={("commons", 2): "slow"}) as fake:
        fake.on_slow = lambda: os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while Commons' page 2 is awaited
        args = ["search", "bears", "--class", "bear", "-n", "100", "--endpoint", f"openverse={fake.openverse}",
                "--endpoint", f"commons={fake.commons}", "--allow-private", "--quiet", "--out", str(out)]
        try:
            rc = main(args)
        except KeyboardInterrupt:  # never let it reach pytest
            pytest.fail("Ctrl-C escaped ursa search")
    assert rc == 130
    printed = capsys.readouterr().out
    assert "Interrupted (Ctrl-C)" in printed and "stopped: interrupted (Ctrl-C)" in printed
    rows = _rows(out)
    assert sum(r["provider"] == "commons" for r in rows) == 50  # Commons' page 1, before the Ctrl-C
    assert sum(r["provider"] == "openverse" for r in rows) >= 20  # Openverse's pages done by then
    assert len({r["url"] for r in rows}) == len(rows) <= 100
