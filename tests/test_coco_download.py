"""--download against a loopback replica of the real COCO host: no caption JSONs, only
annotations/annotations_trainval2014.zip (here over 60 MB), images under train2014/ and
val2014/, keep-alive connections and Range requests as a real web server has them."""

import io
import json
import os
import subprocess
import sys
import zipfile

import pytest

import dataloader
from captioning.fetch import Client, FetchError
from conftest import ROOT

pytestmark = pytest.mark.slow

# instances_*.json stand-in: the archive is larger than 60 MB, and larger than the 100 MB the
# peak-memory test allows, so a download held in memory whole would fail that test.
PADDING_MB = 130


@pytest.fixture(scope="module")
def host_files(shapes_coco):
    """The real host's layout for the shapes set: {url path: bytes}."""
    files = {}
    for folder in ("train2014", "val2014"):
        for name in os.listdir(os.path.join(shapes_coco, folder)):
            with open(os.path.join(shapes_coco, folder, name), "rb") as f:
                files[f"/{folder}/{name}"] = f.read()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for folder in ("train2014", "val2014"):
            z.write(os.path.join(shapes_coco, "annotations", f"captions_{folder}.json"),
                    f"annotations/captions_{folder}.json", compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("annotations/instances_train2014.json", os.urandom(PADDING_MB * 2**20),
                   compress_type=zipfile.ZIP_STORED)
    files["/annotations/annotations_trainval2014.zip"] = buf.getvalue()
    return files


ZIP = "/annotations/annotations_trainval2014.zip"


def _args(url, coco, out, *extra):
    return ["--download", "--coco_dir", str(coco), "--coco_base_url", url, "--limit_data", "20",
            "--val_size", "4", "--test_size", "4", "--encoder_model", "tiny",
            "--decoder_model", "tiny", "--retries", "2", "--timeout", "10", "--num_proc", "1",
            "--quiet", "--save_path", str(out), *extra]


def test_download_from_the_real_hosts_layout_resumes_the_archive(host_files, real_host,
                                                                   tmp_path):
    server = real_host(host_files)
    size = len(host_files[ZIP])
    assert size > 60 * 2**20
    server.cut[ZIP] = 30 * 2**20  # the first response hangs up after 30 MB
    coco = tmp_path / "coco"
    assert dataloader.main(_args(server.url, coco, tmp_path / "data")) == 0
    zip_requests = [r for p, r in server.requests if p == ZIP]
    assert zip_requests == [None, f"bytes={30 * 2**20}-"]  # resumed, not restarted
    assert server.bytes_sent[ZIP] == size  # every byte sent once
    for folder in ("train2014", "val2014"):
        assert (coco / "annotations" / f"captions_{folder}.json").read_bytes() == \
            zipfile.ZipFile(io.BytesIO(host_files[ZIP])).read(f"annotations/captions_{folder}.json")
    m = json.load(open(tmp_path / "data" / "manifest.json"))
    assert m["rows"] == {"train": 20, "validation": 4, "test": 4}
    assert not [f for f in os.listdir(coco / "annotations") if f.endswith(".part")]

    server.requests.clear()  # a second run fetches nothing
    assert dataloader.main(_args(server.url, coco, tmp_path / "data", "--overwrite")) == 0
    assert server.requests == []


def test_a_server_without_ranges_restarts_the_archive(host_files, real_host, tmp_path):
    server = real_host(host_files, ranges=False)
    server.cut[ZIP] = 10 * 2**20
    assert dataloader.main(_args(server.url, tmp_path / "coco", tmp_path / "data")) == 0
    assert server.bytes_sent[ZIP] == 10 * 2**20 + len(host_files[ZIP])


def test_a_stale_or_complete_part_file_is_not_appended_to(host_files, real_host, tmp_path):
    """A .part left from another file (its validator no longer matches) restarts; a .part
    as long as the file (killed before the rename) gets 416 and restarts too."""
    server = real_host(host_files)
    url = server.url + ZIP
    target = tmp_path / "a.zip"
    with Client(timeout=10) as client:
        (tmp_path / "a.zip.part").write_bytes(b"x" * 1000)
        (tmp_path / "a.zip.part.validator").write_text('"another-file"')
        client.download(url, str(target), 2**31)
        assert target.read_bytes() == host_files[ZIP]
        target.unlink()
        (tmp_path / "a.zip.part").write_bytes(host_files[ZIP])
        client.download(url, str(target), 2**31)
        assert target.read_bytes() == host_files[ZIP]
    # the stale one: one request, answered whole (If-Range did not match); the complete one:
    # 416, then a fresh request
    assert [r for p, r in server.requests] == ["bytes=1000-", f"bytes={len(host_files[ZIP])}-",
                                               None]
    assert not list(tmp_path.glob("*.part*"))


def test_a_broken_archive_is_deleted_and_reported(host_files, real_host, tmp_path, capsys):
    data = bytearray(host_files[ZIP])
    member = zipfile.ZipFile(io.BytesIO(host_files[ZIP])).getinfo(
        "annotations/captions_val2014.json")
    data[member.header_offset + 200] ^= 0xFF  # inside the compressed caption data
    server = real_host({**host_files, ZIP: bytes(data)})
    coco = tmp_path / "coco"
    rc = dataloader.main(_args(server.url, coco, tmp_path / "data"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "is broken" in err[-1] and len(err) == 1
    assert os.listdir(coco / "annotations") == []  # nothing half-extracted, archive gone


def test_one_host_many_images_few_connections(host_files, real_host):
    server = real_host(host_files)
    paths = sorted(p for p in host_files if p.startswith("/train2014/"))[:60]
    workers = 4
    from concurrent.futures import ThreadPoolExecutor

    with Client(pool_size=workers, timeout=10) as client, ThreadPoolExecutor(workers) as pool:
        bodies = list(pool.map(lambda p: client.get_bytes(server.url + p, 10**7), paths))
    assert bodies == [host_files[p] for p in paths]
    assert server.connections <= workers + 2


def test_download_run_uses_few_connections(host_files, real_host, tmp_path):
    server = real_host(host_files)
    assert dataloader.main(_args(server.url, tmp_path / "coco", tmp_path / "data",
                                 "--download_workers", "4", "--limit_data", "40",
                                 "--val_size", "8", "--test_size", "8")) == 0
    images = [p for p, _ in server.requests if not p.startswith("/annotations")]
    assert len(images) >= 56
    assert server.connections <= 4 + 2


def test_size_cap_and_short_body_are_errors(real_host):
    server = real_host({"/big": b"x" * 3000, ZIP: b"y" * 100})
    server.cut[ZIP] = 40
    with Client(timeout=5) as client:
        with pytest.raises(FetchError, match="MB limit"):
            client.get_bytes(server.url + "/big", 1000)
        with pytest.raises(FetchError, match="incomplete response"):
            client.get_bytes(server.url + ZIP, 10**6)


def _peak_rss_mb(args):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "dataloader.py"), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, err.decode()[-2000:]
    return usage.ru_maxrss / 1024


def test_archive_download_adds_little_to_peak_memory(host_files, real_host, tmp_path,
                                                     shapes_coco):
    server = real_host(host_files)
    fresh = _peak_rss_mb(_args(server.url, tmp_path / "a", tmp_path / "da"))
    (tmp_path / "b" / "annotations").mkdir(parents=True)
    for folder in ("train2014", "val2014"):
        name = f"captions_{folder}.json"
        (tmp_path / "b" / "annotations" / name).write_bytes(
            open(os.path.join(shapes_coco, "annotations", name), "rb").read())
    present = _peak_rss_mb(_args(server.url, tmp_path / "b", tmp_path / "db"))
    assert fresh - present < 100, (fresh, present)
