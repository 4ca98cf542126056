"""The release layer against a GitHub look-alike on 127.0.0.1: metadata,
channels, hashes, token, ETag, rate limits, and the download's faults."""

import hashlib
import json
import os
import time
import unittest

from tests.support import (
    FakeGitHub,
    Node,
    PanelDatabase,
    file_sha256,
    needs_root,
    xcvm_update,
)


def setup(test, version="1.0.0", is_main=1, channel="stable"):
    db = PanelDatabase(test)
    db.add_server(1, is_main=is_main)
    db.execute("UPDATE settings SET update_channel = %s, auto_update_lbs = 0", (channel,))
    node = Node(test, version=version, database=db, is_lb=not is_main)
    github = FakeGitHub(test, node.releases)
    return node, db, github


def publish(node, github, tag, prerelease=False, digest=True, hashes=None, size=None):
    """Both assets of a release; hashes: None, 'sha256' or 'md5' listing files."""
    version = tag.lstrip("v")
    names = []
    for name in ("xc_vm.tar.gz", "loadbalancer.tar.gz"):
        node.release(version, {"www/flavour.txt": name.encode()}, name=tag + "-" + name)
        os.replace(os.path.join(node.releases, tag + "-" + name), os.path.join(node.releases, name))
        names.append(name)
    if hashes:
        algorithm = hashlib.sha256 if hashes == "sha256" else hashlib.md5
        lines = [f"{file_digest(os.path.join(node.releases, name), algorithm)}  {name}" for name in names]
        with open(os.path.join(node.releases, "hashes." + hashes), "w") as handle:
            handle.write("\n".join(lines) + "\n")
        names.append("hashes." + hashes)
    github.add_release(tag, names, prerelease=prerelease, digest=digest)
    return file_sha256(os.path.join(node.releases, "xc_vm.tar.gz"))


def file_digest(path, algorithm):
    with open(path, "rb") as handle:
        return algorithm(handle.read()).hexdigest()


def check(node, github, *extra, env=None):
    result = node.run("--api-base", github.api_base, "check", "--json", *extra, env=env)
    return result, (json.loads(result.out) if result.out.strip() else None)


@needs_root
class ReleaseMetadataTest(unittest.TestCase):

    def test_check_reports_an_update_and_touches_nothing(self):
        node, _db, github = setup(self)
        publish(node, github, "v1.1.0")
        before = node.snapshot()
        result, report = check(node, github)
        self.assertEqual(result.code, 100, result)
        self.assertEqual(report, {"installed_version": "1.0.0", "node_type": "MAIN", "newest_release": "v1.1.0",
                                  "asset": "xc_vm.tar.gz", "update_available": True})
        self.assertEqual(node.snapshot(), before)
        self.assertFalse(os.path.exists(node.state))
        self.assertEqual(node.calls(), [])

    def test_check_up_to_date_exits_0(self):
        node, _db, github = setup(self, version="1.1.0")
        publish(node, github, "v1.1.0")
        result, report = check(node, github)
        self.assertEqual(result.code, 0, result)
        self.assertFalse(report["update_available"])

    def test_versions_compare_as_versions_not_strings(self):
        node, _db, github = setup(self, version="2.9.3")
        publish(node, github, "v2.10.0")
        publish(node, github, "v2.9.4")
        _result, report = check(node, github)
        self.assertEqual(report["newest_release"], "v2.10.0")

    def test_stable_skips_prereleases_and_drafts_beta_takes_them(self):
        node, db, github = setup(self)
        publish(node, github, "v1.1.0")
        publish(node, github, "v1.2.0-beta1", prerelease=True)
        github.releases.insert(0, dict(github.releases[0], tag_name="v9.0.0", draft=True))
        self.assertEqual(check(node, github)[1]["newest_release"], "v1.1.0")
        db.execute("UPDATE settings SET update_channel = 'beta'")
        self.assertEqual(check(node, github)[1]["newest_release"], "v1.2.0-beta1")
        self.assertEqual(check(node, github, "--channel", "stable")[1]["newest_release"], "v1.1.0")

    def test_lb_takes_the_loadbalancer_asset(self):
        node, _db, github = setup(self, is_main=0)
        publish(node, github, "v1.1.0")
        self.assertEqual(check(node, github)[1]["asset"], "loadbalancer.tar.gz")

    def test_node_type_falls_back_to_config_when_the_database_is_down(self):
        node = Node(self)
        with open(os.path.join(node.root, "config", "config.ini"), "a") as handle:
            handle.write("[XC_VM]\n")
        node.write("config/config.ini", b'[XC_VM]\nhostname = "127.0.0.1"\ndatabase = "x"\nport = 9\nserver_id = 2\n'
                   b'is_lb = 1\n[Encrypted]\nusername = "u"\npassword = "secret-pw"\n')
        github = FakeGitHub(self, node.releases)
        publish(node, github, "v1.1.0")
        result, report = check(node, github)
        self.assertEqual(report["asset"], "loadbalancer.tar.gz")
        self.assertIn("node type LB from config.ini", result.err)
        self.assertNotIn("secret-pw", result.err)

    def test_token_goes_to_the_api_and_never_to_the_asset_host(self):
        node, _db, github = setup(self)
        publish(node, github, "v1.1.0")
        result = node.run("--api-base", github.api_base, "update", env={"GITHUB_TOKEN": "tok-123"})
        self.assertEqual(result.code, 0, result)
        api = [headers for port, _, headers in github.requests if port == github.api.server_port]
        assets = [headers for port, _, headers in github.requests if port == github.assets.server_port]
        self.assertTrue(api and assets)
        self.assertTrue(all(h.get("Authorization") == "Bearer tok-123" for h in api))
        self.assertFalse(any("Authorization" in h for h in assets))
        with open(os.path.join(node.state, "update.log")) as handle:
            self.assertNotIn("tok-123", handle.read() + result.err)

    def test_release_list_is_cached_with_its_etag(self):
        node, _db, github = setup(self)
        publish(node, github, "v1.1.0")
        node.run("--api-base", github.api_base, "update", "--download-only")
        github.requests.clear()
        result = node.run("--api-base", github.api_base, "update", "--download-only")
        self.assertEqual(result.code, 0, result)
        listing = [headers for _, path, headers in github.requests if path.startswith("/repos/")]
        self.assertTrue(listing[0].get("If-None-Match"), listing)

    def test_rate_limit_says_when_to_retry(self):
        node, _db, github = setup(self)
        github.rate_limited = True
        result = node.run("--api-base", github.api_base, "update")
        self.assertEqual(result.code, 1, result)
        self.assertIn("rate limit reached (HTTP 403): retry after", result.err)
        self.assertIn("github_token", result.err)

    def rejected(self, expected, prepare):
        node, db, github = setup(self)
        prepare(node, github)
        result = node.run("--api-base", github.api_base, "update")
        self.assertEqual(result.code, 3, result)
        self.assertIn(expected, result.err)
        self.assertFalse(os.path.exists(os.path.join(node.root, "tmp", ".update.tar.gz")))
        self.assertEqual(node.calls(), [])
        self.assertEqual(db.server_row(), ("1.0.0", 1))

    def test_malformed_json(self):
        def prepare(node, github):
            github.malformed = True
        self.rejected("not valid JSON", prepare)

    def test_missing_asset(self):
        def prepare(node, github):
            publish(node, github, "v1.1.0")
            github.releases[0]["assets"] = [a for a in github.releases[0]["assets"] if a["name"] != "xc_vm.tar.gz"]
        self.rejected("release v1.1.0 has no asset xc_vm.tar.gz", prepare)

    def test_missing_hash(self):
        def prepare(node, github):
            publish(node, github, "v1.1.0", digest=False)
        self.rejected("no hash for xc_vm.tar.gz", prepare)

    def test_unknown_wanted_tag(self):
        node, _db, github = setup(self)
        publish(node, github, "v1.1.0")
        result = node.run("--api-base", github.api_base, "update", "--version", "v7.7.7")
        self.assertEqual(result.code, 3, result)
        self.assertIn("v7.7.7 is not among the published releases", result.err)


@needs_root
class DownloadAndUpdateTest(unittest.TestCase):

    def update(self, node, github, *extra, expect=0):
        result = node.run("--api-base", github.api_base, "update", *extra)
        self.assertEqual(result.code, expect, result)
        return result

    def test_update_with_the_asset_digest(self):
        node, db, github = setup(self)
        sha = publish(node, github, "v1.1.0")
        self.update(node, github)
        self.assertEqual(node.version(), "1.1.0")
        self.assertEqual(node.state_json("last_result.json")["archive_sha256"], sha)
        self.assertEqual(db.server_row(), ("1.1.0", 1))
        self.assertFalse(os.path.exists(os.path.join(node.root, "tmp", ".update.tar.gz")), "download kept")
        redirected = [path for port, path, _ in github.requests if port == github.assets.server_port]
        self.assertEqual(redirected, ["/assets/v1.1.0/xc_vm.tar.gz"])

    def test_update_with_a_hashes_sha256_asset(self):
        node, _db, github = setup(self)
        publish(node, github, "v1.1.0", digest=False, hashes="sha256")
        self.update(node, github)
        self.assertEqual(node.version(), "1.1.0")

    def test_update_with_only_md5_is_accepted_and_called_weak(self):
        node, _db, github = setup(self)
        publish(node, github, "v1.1.0", digest=False, hashes="md5")
        result = self.update(node, github)
        self.assertIn("MD5 is weak", result.err)
        self.assertEqual(node.version(), "1.1.0")

    def test_equal_version_needs_force_older_needs_an_explicit_tag(self):
        node, _db, github = setup(self, version="1.1.0")
        publish(node, github, "v1.0.0")
        publish(node, github, "v1.1.0")
        result = self.update(node, github)
        self.assertIn("up to date", result.err)
        self.assertEqual(node.calls(), [])
        self.update(node, github, "--version", "v1.0.0")
        self.assertEqual(node.version(), "1.0.0")
        self.update(node, github)
        self.assertEqual(node.version(), "1.1.0")
        self.update(node, github, "--force")
        self.assertEqual(node.calls().count("stop xc_vm"), 3)

    def test_download_only(self):
        node, _db, github = setup(self)
        sha = publish(node, github, "v1.1.0")
        result = self.update(node, github, "--download-only")
        target = os.path.join(node.root, "tmp", ".update.tar.gz")
        self.assertEqual(result.out.strip(), f"{target} sha256:{sha}")
        self.assertEqual(file_sha256(target), sha)
        self.assertEqual(node.version(), "1.0.0")
        self.assertEqual(node.calls(), [])

    def test_manual_url_and_sha256(self):
        node, _db, github = setup(self)
        sha = publish(node, github, "v1.1.0")
        url = f"http://127.0.0.1:{github.assets.server_port}/assets/v1.1.0/xc_vm.tar.gz"
        self.update(node, github, "--url", url, "--sha256", sha)
        self.assertEqual(node.version(), "1.1.0")
        result = self.update(node, github, "--url", url, expect=1)
        self.assertIn("--url needs --sha256", result.err)

    def test_dropped_connections_resume_with_range(self):
        node, _db, github = setup(self)
        publish(node, github, "v1.1.0")
        size = os.path.getsize(os.path.join(node.releases, "xc_vm.tar.gz"))
        github.cut_at = [size // 3, size * 2 // 3]
        result = self.update(node, github)
        self.assertIn("retrying", result.err)
        ranges = [h.get("Range") for port, _, h in github.requests if port == github.assets.server_port]
        self.assertEqual(ranges, [None, f"bytes={size // 3}-", f"bytes={size * 2 // 3}-"])
        self.assertEqual(node.version(), "1.1.0")

    def test_server_that_ignores_range_restarts_cleanly(self):
        node, _db, github = setup(self)
        publish(node, github, "v1.1.0")
        size = os.path.getsize(os.path.join(node.releases, "xc_vm.tar.gz"))
        github.cut_at = [size // 2]
        github.ignore_range = True
        result = self.update(node, github)
        self.assertIn("starting over", result.err)
        self.assertEqual(node.version(), "1.1.0")

    def test_download_cut_too_often_fails_and_keeps_nothing(self):
        node, _db, github = setup(self)
        publish(node, github, "v1.1.0")
        github.cut_at = [10, 20, 30, 40]
        result = self.update(node, github, expect=1)
        self.assertIn("cut off", result.err)
        self.assertFalse(os.path.exists(os.path.join(node.root, "tmp", ".update.tar.gz")))
        self.assertEqual(node.calls(), [])

    def test_wrong_bytes_are_deleted(self):
        node, db, github = setup(self)
        publish(node, github, "v1.1.0")
        github.corrupt = True
        result = self.update(node, github, expect=3)
        self.assertIn("sha256 hash mismatch", result.err)
        self.assertFalse(os.path.exists(os.path.join(node.root, "tmp", ".update.tar.gz")))
        self.assertEqual((node.version(), node.calls(), db.server_row()), ("1.0.0", [], ("1.0.0", 1)))

    def test_bytes_past_the_declared_size_stop_the_download(self):
        node, _db, github = setup(self)
        publish(node, github, "v1.1.0")
        github.extra_bytes = 4096
        result = self.update(node, github, expect=3)
        self.assertIn("past the declared", result.err)
        self.assertFalse(os.path.exists(os.path.join(node.root, "tmp", ".update.tar.gz")))

    def test_a_server_that_never_answers_times_out(self):
        node, _db, github = setup(self)
        github.hang_api = True
        started = time.monotonic()
        result = self.update(node, github, expect=1)
        self.assertLess(time.monotonic() - started, 20)
        self.assertIn("timed out", result.err)

    def test_progress_bar_only_on_a_terminal(self):
        node, _db, github = setup(self)
        publish(node, github, "v1.1.0")
        result = self.update(node, github, "--download-only")
        self.assertNotIn("\r", result.err)

    def test_hash_helpers(self):
        self.assertEqual(xcvm_update.parse_hash("SHA256:" + "A" * 64), "sha256:" + "a" * 64)


if __name__ == "__main__":
    unittest.main()
