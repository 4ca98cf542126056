"""The fault matrix: SIGKILL at every journal step and mid-swap, then the next
poll brings the node to exactly the old or exactly the new tree, running, and
says which; plus a full disk, a database that goes away, and concurrency."""

import json
import os
import unittest

from tests.support import Node, PanelDatabase, needs_root

RELEASE = {f"www/page{n:02d}.php": b"<?php // page %d\n" % n for n in range(12)}
RELEASE["www/assets/app.js"] = b"// new\n"


def tree(node):
    """The node's tree but its own config.ini (each test node has its own DB)."""
    snapshot = node.snapshot()
    del snapshot["config/config.ini"]
    return snapshot


@needs_root
class CrashMatrixTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.expected_new = None

    def make_node(self):
        db = PanelDatabase(self)
        db.add_server(1, is_main=1)
        node = Node(self, database=db)
        node.write("www/page00.php", b"<?php // old page 0\n")
        node.write("www/assets/app.js", b"// old\n")
        return node, db

    def new_tree(self):
        """The exact tree a clean install of the release leaves, and its plan size."""
        if CrashMatrixTest.expected_new is None:
            node, _ = self.make_node()
            archive, sha = node.release("1.1.0", RELEASE)
            result = node.run("install", archive, sha)
            self.assertEqual(result.code, 0, result)
            backups = os.path.join(node.state, "backups")
            with open(os.path.join(backups, os.listdir(backups)[0], "plan.json")) as handle:
                CrashMatrixTest.expected_new = (tree(node), len(json.load(handle)))
        return CrashMatrixTest.expected_new

    def crash(self, point, expect, setup=None):
        new_tree, _ = self.new_tree()
        node, db = self.make_node()
        old_tree = node.snapshot()
        archive, sha = node.release("1.1.0", RELEASE)
        if setup:
            setup(node)
        killed = node.run("install", archive, sha, env={"XCVM_UPDATE_CRASH_AT": point})
        self.assertEqual(killed.code, -9, f"{point}: the crash point was not reached: {killed!r}")
        if setup:
            for name in ("fail-start",):
                if os.path.exists(os.path.join(node.dir, name)):
                    node.remove(name)
        report = node.status()
        self.assertTrue(report["in_progress"] or report["finalize_pending"], report)
        recovered = node.run("poll")
        self.assertEqual(recovered.code, 0, recovered)
        self.assertTrue(node.active(), f"{point}: the service is not running after recovery")
        self.assertFalse(os.path.exists(os.path.join(node.state, "journal.json")))
        last = node.state_json("last_result.json")
        syslog = " | ".join(db.syslog())
        if expect == "old":
            self.assertEqual(node.snapshot(), old_tree, point)
            self.assertIn(last["step"], ("rolled_back", "interrupted"), point)
            self.assertIn("1.0.0 runs", syslog)
            self.assertEqual(db.server_row(), ("1.0.0", 1))
        else:
            self.assertEqual(tree(node), new_tree, point)
            self.assertEqual(last["step"], "finalized", point)
            self.assertIn("update to 1.1.0 complete", syslog)
            self.assertEqual(db.server_row(), ("1.1.0", 1))
        self.assertEqual(node.status()["in_progress"], None)
        return node

    def test_kill_while_verifying(self):
        self.crash("verifying", "old")

    def test_kill_when_staged(self):
        self.crash("staged", "old")

    def test_kill_when_stopped(self):
        self.crash("stopped", "old")

    def test_kill_at_the_start_of_the_swap(self):
        self.crash("swapping", "old")

    def test_kill_mid_swap_at_several_offsets(self):
        _, rows = self.new_tree()
        for offset in sorted({0, 1, 2, rows // 3, rows // 2, rows - 2, rows - 1}):
            with self.subTest(offset=offset):
                self.crash(f"swap:{offset}", "old")

    def test_kill_when_swapped(self):
        self.crash("swapped", "old")

    def test_kill_when_starting(self):
        self.crash("starting", "old")

    def test_kill_after_the_gate_passed(self):
        self.crash("started", "new")

    def test_kill_after_commit(self):
        self.crash("committed", "new")

    def test_kill_while_rolling_back(self):
        self.crash("rolling_back", "old", setup=lambda node: node.touch("fail-start", "1.1.0"))

    def test_kill_during_the_rollback_command_keeps_the_running_release(self):
        new_tree, _ = self.new_tree()
        node, _db = self.make_node()
        archive, sha = node.release("1.1.0", RELEASE)
        self.assertEqual(node.run("install", archive, sha).code, 0)
        self.assertEqual(tree(node), new_tree)
        killed = node.run("rollback", env={"XCVM_UPDATE_CRASH_AT": "swapping"})
        self.assertEqual(killed.code, -9)
        self.assertEqual(node.run("poll").code, 0)
        self.assertEqual(tree(node), new_tree)
        self.assertTrue(node.active())
        self.assertEqual(node.state_json("last_result.json")["step"], "rolled_back")
        self.assertEqual(node.run("rollback").code, 0, "the backup survives an interrupted rollback")
        self.assertEqual(node.version(), "1.0.0")

    def test_install_and_rollback_also_recover_first(self):
        for command in ("install", "rollback"):
            with self.subTest(command=command):
                node, _db = self.make_node()
                old_tree = node.snapshot()
                archive, sha = node.release("1.1.0", RELEASE)
                self.assertEqual(node.run("install", archive, sha, env={"XCVM_UPDATE_CRASH_AT": "swap:3"}).code, -9)
                result = node.run(*(["install", archive, sha] if command == "install" else ["rollback"]))
                self.assertEqual(result.code, 0, result)
                self.assertIn("recovering", result.err)
                if command == "rollback":
                    self.assertEqual(node.snapshot(), old_tree)
                else:
                    self.assertEqual(node.version(), "1.1.0")


@needs_root
class EnvironmentFaultTest(unittest.TestCase):

    def test_disk_full_while_staging_changes_nothing(self):
        node = Node(self, tmpfs_size="2m", content_files=5)
        before = node.snapshot()
        archive, sha = node.release("1.1.0", {"www/big.bin": os.urandom(1200 * 1024)})
        result = node.run("install", archive, sha)
        self.assertEqual(result.code, 1, result)
        self.assertIn("no space left", result.err)
        self.assertEqual(node.calls(), [])
        self.assertEqual(node.snapshot(), before)
        self.assertEqual(os.listdir(os.path.join(node.state, "txn")), [])
        self.assertEqual(node.state_json("last_result.json")["step"], "failed")

    def test_database_gone_during_the_update_then_back(self):
        db = PanelDatabase(self).private_user()
        db.add_server(1, is_main=1)
        db.add_server(2)
        node = Node(self, database=db)
        archive, sha = node.release("1.1.0")
        node.touch("block-start")
        install = node.start("install", archive, sha)
        node.wait_for(lambda: "start xc_vm" in node.calls(), "the install to start the service")
        db.lock_user()
        node.remove("block-start")
        _out, err = install.communicate(timeout=60)
        self.assertEqual(install.returncode, 0, err)
        self.assertIn("finalize of 1.1.0 is pending", err)
        self.assertNotIn(db.password, err)
        self.assertEqual(node.version(), "1.1.0")
        self.assertTrue(node.status()["finalize_pending"])
        self.assertEqual(node.run("poll").code, 1, "still no database: the finalize stays pending")
        self.assertTrue(node.status()["finalize_pending"])
        db.lock_user(False)
        result = node.run("poll")
        self.assertEqual(result.code, 0, result)
        self.assertFalse(node.status()["finalize_pending"])
        self.assertEqual(db.server_row(), ("1.1.0", 1))
        self.assertEqual([row[0] for row in db.signals()], [2], "the LB is told once the finalize lands")
        with open(os.path.join(node.state, "update.log")) as handle:
            self.assertNotIn(db.password, handle.read())

    def test_signal_inserted_while_an_update_runs_is_kept_for_the_next_poll(self):
        db = PanelDatabase(self)
        db.add_server(1, is_main=1)
        db.execute("UPDATE settings SET auto_update_lbs = 0")
        node = Node(self, database=db)
        _archive, _sha = node.release("1.1.0")
        github = __import__("tests.support", fromlist=["FakeGitHub"]).FakeGitHub(self, node.releases)
        github.add_release("v1.1.0", ["xc_vm.tar.gz"])
        db.signal(1)
        node.touch("block-stop")
        poll = node.start("--api-base", github.api_base, "poll")
        node.wait_for(lambda: "stop xc_vm" in node.calls(), "the update to stop the service")
        db.signal(1)
        db.signal(1, '{"action":"restart_services"}')
        node.remove("block-stop")
        _out, err = poll.communicate(timeout=60)
        self.assertEqual(poll.returncode, 0, err)
        self.assertEqual(node.version(), "1.1.0")
        self.assertEqual(len(db.signals()), 2, "the new update signal or the foreign one was consumed")
        result = node.run("--api-base", github.api_base, "poll")
        self.assertEqual(result.code, 0, result)
        self.assertIn("up to date", result.err)
        self.assertEqual(db.signals(), ((1, '{"action":"restart_services"}', 0),))


if __name__ == "__main__":
    unittest.main()
