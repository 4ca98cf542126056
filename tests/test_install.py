"""The privileged transaction: install, health gate, rollback, status, lock."""

import json
import os
import time
import unittest

from tests.support import Node, needs_root, snapshot, xcvm_update


@needs_root
class InstallTest(unittest.TestCase):

    def test_good_update_swaps_in_the_new_tree(self):
        node = Node(self)
        before = node.snapshot()
        archive, sha = node.release("1.1.0", {"www/new_page.php": b"<?php\n",
                                              "bin/nginx/conf/custom.conf": b"# must not land\n",
                                              "content/streams/00001.ts": b"must not land\n"})
        result = node.run("install", archive, "sha256:" + sha)
        self.assertEqual(result.code, 0, result)
        self.assertEqual(node.version(), "1.1.0")
        self.assertEqual(node.calls(), ["stop xc_vm", "daemon-reload", "start xc_vm", "is-active xc_vm"])
        self.assertTrue(node.active())
        after = node.snapshot()
        self.assertIn("www/new_page.php", after)
        self.assertIn("www/old_only.php", after, "no manifest yet: nothing is known to be obsolete")
        with open(os.path.join(node.root, "bin/nginx/conf/custom.conf"), "rb") as handle:
            self.assertEqual(handle.read(), b"# the operator's own\n")
        content = {rel: entry for rel, entry in before.items() if rel.startswith("content")}
        self.assertEqual(content, {rel: entry for rel, entry in after.items() if rel.startswith("content")})
        last = node.state_json("last_result.json")
        self.assertEqual((last["step"], last["from_version"], last["to_version"]), ("committed", "1.0.0", "1.1.0"))
        self.assertEqual(last["archive_sha256"], sha)
        self.assertTrue(node.status()["finalize_pending"], "no database here: the finalize waits for poll")
        newer, sha = node.release("1.2.0", removed=("www/old_only.php", "www/new_page.php"))
        self.assertEqual(node.run("install", newer, sha).code, 0)
        self.assertFalse(os.path.exists(os.path.join(node.root, "www/new_page.php")),
                         "a file of the previous release's manifest that the new one drops stays")
        self.assertTrue(os.path.exists(os.path.join(node.root, "www/old_only.php")))

    def test_ownership_only_on_what_the_update_wrote(self):
        import pwd

        node = Node(self)
        archive, sha = node.release("1.1.0", {"www/new_page.php": b"<?php\n"})
        self.assertEqual(node.run("install", archive, sha).code, 0)
        uid = pwd.getpwnam(node.owner.split(":")[0]).pw_uid
        tree = node.snapshot()
        for rel in ("www/new_page.php", "www/index.php", "www", "status"):
            self.assertEqual(tree[rel][2], uid, rel)
        for rel, entry in tree.items():
            if rel.startswith(("content", "config", "bin/nginx/conf/custom.conf")):
                self.assertEqual(entry[2], 0, f"{rel} was chowned")

    def test_modes_lose_setuid_and_group_write(self):
        node = Node(self)
        archive, _sha = node.release("1.1.0")
        import gzip
        import io
        import tarfile

        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar, tarfile.open(archive) as source:
            for member in source.getmembers():
                if member.name == "www/index.php":
                    member.mode = 0o6777
                tar.addfile(member, source.extractfile(member) if member.isfile() else None)
        with open(archive, "wb") as handle:
            handle.write(gzip.compress(raw.getvalue()))
        self.assertEqual(node.run("install", archive, xcvm_update._file_sha256(archive)).code, 0)
        self.assertEqual(node.snapshot()["www/index.php"][1], 0o755)

    def test_md5_hash_and_bare_hex_are_accepted(self):
        import hashlib

        node = Node(self)
        archive, _ = node.release("1.1.0")
        with open(archive, "rb") as handle:
            md5 = hashlib.md5(handle.read()).hexdigest()
        result = node.run("install", archive, md5)
        self.assertEqual(result.code, 0, result)
        self.assertEqual(node.version(), "1.1.0")

    def test_wrong_hash_changes_nothing(self):
        node = Node(self)
        before = node.snapshot()
        archive, _sha = node.release("1.1.0")
        result = node.run("install", archive, "sha256:" + "0" * 64)
        self.assertEqual(result.code, 3, result)
        self.assertIn("expected " + "0" * 64, result.err)
        self.assertEqual(node.snapshot(), before)
        self.assertEqual(node.calls(), [])
        self.assertEqual(node.state_json("last_result.json")["step"], "rejected")
        self.assertEqual(os.listdir(os.path.join(node.state, "txn")), [])

    def test_bad_hash_syntax_is_rejected_before_anything(self):
        node = Node(self)
        archive, _ = node.release("1.1.0")
        result = node.run("install", archive, "sha1:abcd")
        self.assertEqual(result.code, 3, result)
        self.assertIn("bad hash", result.err)

    def test_new_version_that_fails_to_start_is_rolled_back(self):
        node = Node(self)
        before = node.snapshot()
        archive, sha = node.release("1.1.0", {"www/new_page.php": b"<?php\n"})
        node.touch("fail-start", "1.1.0")
        result = node.run("install", archive, sha)
        self.assertEqual(result.code, 4, result)
        self.assertIn("rolled back", result.err)
        self.assertIn("start xc_vm", result.err)
        self.assertEqual(node.snapshot(), before)
        self.assertTrue(node.active())
        self.assertEqual(node.state_json("last_result.json")["step"], "rolled_back")
        self.assertEqual(node.status()["installed_version"], "1.0.0")

    def test_inactive_after_start_is_rolled_back(self):
        node = Node(self)
        before = node.snapshot()
        archive, sha = node.release("1.1.0")
        node.touch("fail-is-active", "1.1.0")
        result = node.run("install", archive, sha)
        self.assertEqual(result.code, 4, result)
        self.assertIn("not active", result.err)
        self.assertEqual(node.snapshot(), before)

    def test_failing_status_command_is_rolled_back(self):
        node = Node(self)
        before = node.snapshot()
        archive, sha = node.release("1.1.0")
        node.touch("fail-status")
        result = node.run("install", archive, sha)
        self.assertEqual(result.code, 4, result)
        self.assertIn("status command failed", result.err)
        self.assertEqual(node.snapshot(), before)
        self.assertTrue(node.active())

    def test_failing_nginx_config_test_is_rolled_back(self):
        node = Node(self)
        node.write("bin/nginx/sbin/nginx", b"#!/bin/sh\ngrep -q broken \"$3conf/nginx.conf\" && "
                                           b"{ echo 'nginx: configuration test failed'; exit 1; }\nexit 0\n", 0o755)
        before = node.snapshot()
        archive, sha = node.release("1.1.0", {"bin/nginx/conf/nginx.conf": b"broken;\n"})
        result = node.run("install", archive, sha)
        self.assertEqual(result.code, 4, result)
        self.assertIn("nginx -t failed", result.err)
        self.assertNotIn("start xc_vm", node.calls()[:2])
        self.assertEqual(node.snapshot(), before)
        good, sha = node.release("1.1.0")
        self.assertEqual(node.run("install", good, sha).code, 0)

    def test_health_url_must_answer(self):
        node = Node(self, settings="health_url = http://127.0.0.1:9/health\n")
        before = node.snapshot()
        archive, sha = node.release("1.1.0")
        result = node.run("install", archive, sha)
        self.assertEqual(result.code, 4, result)
        self.assertIn("health check", result.err)
        self.assertEqual(node.snapshot(), before)

    def test_rollback_that_cannot_start_the_old_version_says_what_to_do(self):
        node = Node(self)
        archive, sha = node.release("1.1.0")
        node.touch("fail-start")
        result = node.run("install", archive, sha)
        self.assertEqual(result.code, 5, result)
        self.assertIn("rollback", result.err)
        self.assertTrue(node.status()["operator_action_needed"])
        self.assertEqual(node.run("poll").code, 5)
        self.assertEqual(node.run("install", archive, sha).code, 5)
        node.remove("fail-start")
        result = node.run("rollback")
        self.assertEqual(result.code, 0, result)
        self.assertEqual(node.version(), "1.0.0")
        self.assertTrue(node.active())
        self.assertEqual(node.state_json("last_result.json")["step"], "rolled_back")

    def test_second_install_while_one_runs_exits_75(self):
        node = Node(self)
        archive, sha = node.release("1.1.0")
        node.touch("block-stop")
        first = node.start("install", archive, sha)
        node.wait_for(lambda: "stop xc_vm" in node.calls(), "the first install to stop the service")
        started = time.monotonic()
        second = node.run("install", archive, sha)
        self.assertEqual(second.code, 75, second)
        self.assertLess(time.monotonic() - started, 5)
        self.assertIn("busy", second.err)
        node.remove("block-stop")
        self.assertEqual(first.wait(60), 0, first.stderr.read())

    def test_rollback_command_restores_the_previous_release(self):
        node = Node(self)
        before = node.snapshot()
        archive, sha = node.release("1.1.0", {"www/new_page.php": b"<?php\n"})
        self.assertEqual(node.run("install", archive, sha).code, 0)
        self.assertEqual(len(node.status()["backups"]), 1)
        result = node.run("rollback")
        self.assertEqual(result.code, 0, result)
        self.assertEqual(node.snapshot(), before)
        self.assertTrue(node.active())
        last = node.state_json("last_result.json")
        self.assertEqual((last["kind"], last["step"], last["to_version"]), ("rollback", "committed", "1.0.0"))
        self.assertEqual(node.status()["backups"], [])
        self.assertEqual(node.run("rollback").code, 1)

    def test_rollback_command_that_fails_its_gate_keeps_the_current_release(self):
        node = Node(self)
        archive, sha = node.release("1.1.0")
        self.assertEqual(node.run("install", archive, sha).code, 0)
        after = node.snapshot()
        node.touch("fail-start", "1.0.0")
        result = node.run("rollback")
        self.assertEqual(result.code, 4, result)
        self.assertEqual(node.snapshot(), after)
        self.assertTrue(node.active())

    def test_keep_backups_prunes_old_ones(self):
        node = Node(self, settings="keep_backups = 1\n")
        for version in ("1.1.0", "1.2.0", "1.3.0"):
            archive, sha = node.release(version)
            self.assertEqual(node.run("install", archive, sha).code, 0)
        backups = node.status()["backups"]
        self.assertEqual([(b["from_version"], b["to_version"]) for b in backups], [("1.2.0", "1.3.0")])

    def test_deleted_files_list_removes_and_rollback_restores(self):
        node = Node(self)
        node.write("www/legacy.php", b"<?php // old\n")
        node.write("content/keep.me", b"data")
        before = node.snapshot()
        listing = b"www/legacy.php\ncontent/keep.me\n../outside\n/etc/passwd\nconfig\n"
        archive, sha = node.release("1.1.0", {"migrations/deleted_files.txt": listing})
        self.assertEqual(node.run("install", archive, sha).code, 0)
        self.assertFalse(os.path.exists(os.path.join(node.root, "www/legacy.php")))
        self.assertTrue(os.path.exists(os.path.join(node.root, "content/keep.me")))
        self.assertTrue(os.path.exists(os.path.join(node.root, "config/config.ini")))
        self.assertEqual(node.run("rollback").code, 0)
        self.assertEqual(node.snapshot(), before)

    def test_large_content_is_neither_walked_nor_chowned(self):
        node = Node(self, content_files=5000)
        before = {rel: entry for rel, entry in node.snapshot().items() if rel.startswith("content")}
        archive, sha = node.release("1.1.0")
        self.assertEqual(node.run("install", archive, sha).code, 0)
        after = {rel: entry for rel, entry in node.snapshot().items() if rel.startswith("content")}
        self.assertEqual(before, after)
        last = node.state_json("last_result.json")
        self.assertLess(last["added"] + last["replaced"], 20)

    def test_version_comes_from_the_archive_or_the_flag(self):
        node = Node(self)
        archive, sha = node.release("1.1.0")
        self.assertEqual(node.run("install", archive, sha, "--version", "v1.1.0").code, 0)
        self.assertEqual(node.state_json("last_result.json")["to_version"], "1.1.0")

    def test_status_is_read_only_and_reports_the_last_outcome(self):
        node = Node(self)
        report = node.status()
        self.assertEqual(report["installed_version"], "1.0.0")
        self.assertIsNone(report["in_progress"])
        self.assertFalse(os.path.exists(node.state), "status created the state dir")
        archive, sha = node.release("1.1.0")
        node.run("install", archive, sha)
        text = node.run("status")
        self.assertIn("last outcome: committed 1.0.0 -> 1.1.0", text.out)
        self.assertIn("finalize pending", text.out)
        self.assertIn("backup kept", text.out)

    def test_log_never_holds_the_database_password(self):
        node = Node(self)
        archive, sha = node.release("1.1.0")
        result = node.run("install", archive, sha)
        with open(os.path.join(node.state, "update.log")) as handle:
            log = handle.read()
        self.assertIn("installed 1.1.0", log)
        self.assertNotIn("s3cret-db-pass", log + result.err + result.out)

    def test_state_dir_on_another_filesystem(self):
        import subprocess

        node = Node(self)
        state = os.path.join(node.dir, "state")
        os.makedirs(state)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", state], check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", state])
        before = node.snapshot()
        archive, sha = node.release("1.1.0")
        result = node.run("--state-dir", state, "install", archive, sha)
        self.assertEqual(result.code, 0, result)
        self.assertEqual(node.version(), "1.1.0")
        self.assertTrue(os.path.exists(os.path.join(state, "last_result.json")))
        work = os.path.join(node.root, ".xcvm-update-work")
        self.assertEqual(os.stat(work).st_mode & 0o777, 0o700)
        self.assertEqual(node.run("--state-dir", state, "rollback").code, 0)
        after = node.snapshot()
        self.assertEqual({k: v for k, v in after.items() if not k.startswith(".xcvm-update-work")}, before)

    def test_state_dir_is_private(self):
        node = Node(self)
        archive, sha = node.release("1.1.0")
        node.run("install", archive, sha)
        self.assertEqual(os.stat(node.state).st_mode & 0o777, 0o700)


class HelpTest(unittest.TestCase):

    def test_every_command_has_help_and_exit_codes(self):
        node = Node(self)
        for command in ("poll", "check", "update", "install", "post-update", "status", "rollback", "demo"):
            result = node.run(command, "--help")
            self.assertEqual(result.code, 0, result)
            self.assertIn("75", result.out)

    def test_usage_error_exits_2(self):
        node = Node(self)
        self.assertEqual(node.run("install").code, 2)
        self.assertEqual(node.run("no-such-command").code, 2)

    def test_bad_settings_file_names_the_key(self):
        node = Node(self, settings="keep_backups = many\n")
        result = node.run("status")
        self.assertEqual(result.code, 1)
        self.assertIn("keep_backups", result.err)
        self.assertEqual(len(result.err.strip().splitlines()), 1)


class UnitTest(unittest.TestCase):

    def test_version_order(self):
        key = xcvm_update.version_key
        self.assertGreater(key("v2.10.0"), key("v2.9.3"))
        self.assertGreater(key("2.1.2"), key("v2.1.2-rc1"))
        self.assertGreater(key("2.1.2-rc1"), key("2.1.2-beta2"))
        self.assertEqual(key("v2.1"), key("2.1.0"))
        self.assertIsNone(key("latest"))
        self.assertTrue(xcvm_update.is_newer("v2.1.3", "2.1.2"))
        self.assertFalse(xcvm_update.is_newer("v2.1.2", "2.1.2"))

    def test_parse_hash(self):
        self.assertEqual(xcvm_update.parse_hash("A" * 64), "sha256:" + "a" * 64)
        self.assertEqual(xcvm_update.parse_hash("md5:" + "b" * 32), "md5:" + "b" * 32)
        for bad in ("", "sha256:abc", "x" * 64, "sha1:" + "a" * 40):
            with self.assertRaises(xcvm_update.Rejected):
                xcvm_update.parse_hash(bad)

    def test_journal_write_is_atomic_json(self):
        import tempfile

        folder = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, folder)
        path = os.path.join(folder, "journal.json")
        xcvm_update.write_json_atomic(path, {"step": "staged"})
        with open(path) as handle:
            self.assertEqual(json.load(handle), {"step": "staged"})
        self.assertEqual(os.listdir(folder), ["journal.json"])

    def test_snapshot_sees_modes_and_links(self):
        import tempfile

        folder = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, folder)
        os.symlink("target", os.path.join(folder, "link"))
        self.assertEqual(snapshot(folder)["link"][4], "-> target")
