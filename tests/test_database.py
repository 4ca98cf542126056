"""The database layer against a real MariaDB: poll's claim, post-update's
finalize and LB propagation, node config, failure memory."""

import os
import threading
import unittest

from tests.support import FakeGitHub, Node, PanelDatabase, needs_root, xcvm_update

UPDATE = '{"action":"update"}'


def main_node(test, version="1.0.0", **options):
    db = PanelDatabase(test)
    db.add_server(1, is_main=1, version=version)
    node = Node(test, version=version, database=db, **options)
    github = FakeGitHub(test, node.releases)
    return node, db, github


def publish(node, github, version, **changes):
    node.release(version, changes or None)
    node.release(version, changes or None, name="loadbalancer.tar.gz")
    github.add_release("v" + version, ["xc_vm.tar.gz", "loadbalancer.tar.gz"])


@needs_root
class PollTest(unittest.TestCase):

    def test_nothing_to_do_is_quiet_and_fast(self):
        node, db, github = main_node(self)
        db.signal(1, '{"action":"restart_services"}')
        result = node.run("poll")
        self.assertEqual((result.code, result.out, result.err), (0, "", ""))
        self.assertEqual(len(db.signals()), 1)
        self.assertEqual(github.requests, [], "an idle poll asked GitHub")

    def test_claims_and_updates_and_finalizes(self):
        node, db, github = main_node(self)
        db.add_server(2)
        publish(node, github, "1.1.0")
        db.signal(1)
        result = node.run("--api-base", github.api_base, "poll")
        self.assertEqual(result.code, 0, result)
        self.assertEqual(node.version(), "1.1.0")
        self.assertEqual(db.server_row(), ("1.1.0", 1))
        self.assertEqual([(row[0], row[1]) for row in db.signals()], [(2, UPDATE)], "only the LB's new signal remains")
        syslog = db.syslog()
        for expected in ("claimed", "downloaded and verified", "committed", "complete; 1 load balancers signalled"):
            self.assertTrue(any(expected in line for line in syslog), f"{expected} not in {syslog}")
        self.assertEqual(node.state_json("last_result.json")["step"], "finalized")

    def test_three_pending_signals_make_one_update(self):
        node, db, github = main_node(self)
        publish(node, github, "1.1.0")
        for _ in range(3):
            db.signal(1)
        self.assertEqual(node.run("--api-base", github.api_base, "poll").code, 0)
        self.assertEqual(db.signals(), ())
        listings = [path for port, path, _ in github.requests if path.startswith("/repos/")]
        self.assertEqual(len(listings), 1)
        self.assertEqual(sum("stop xc_vm" == call for call in node.calls()), 1)

    def test_foreign_signals_are_never_touched(self):
        node, db, github = main_node(self)
        publish(node, github, "1.1.0")
        db.add_server(2, status=0)
        foreign = [(1, '{"action":"restart_services"}', 0), (2, UPDATE, 0), (1, UPDATE, 1),
                   (1, "not json at all: update", 0), (1, '{"action":"update_geoip"}', 0)]
        for server_id, data, cache in foreign:
            db.signal(server_id, data, cache)
        db.signal(1)
        self.assertEqual(node.run("--api-base", github.api_base, "poll").code, 0)
        self.assertEqual(sorted(db.signals()), sorted(foreign))

    def paused_poll(self):
        """A node whose poll is updating, held at the service stop."""
        node, db, github = main_node(self)
        publish(node, github, "1.1.0")
        db.signal(1)
        node.touch("block-stop")
        poll = node.start("--api-base", github.api_base, "poll")
        node.wait_for(lambda: "stop xc_vm" in node.calls(), "the poll's stop")
        return node, db, github, poll

    def test_status_is_5_while_updating(self):
        node, db, _, poll = self.paused_poll()
        self.assertEqual(db.server_row()[1], 5)
        self.assertIsNotNone(node.status()["in_progress"])
        node.remove("block-stop")
        self.assertEqual(poll.wait(60), 0)
        self.assertEqual(db.server_row(), ("1.1.0", 1))

    def test_two_polls_on_one_node_one_runs_the_other_is_busy(self):
        node, _, github, first = self.paused_poll()
        second = node.run("--api-base", github.api_base, "poll")
        self.assertEqual((second.code, second.err), (75, ""))
        node.remove("block-stop")
        self.assertEqual(first.wait(60), 0)

    def test_claim_race_between_nodes_has_one_winner(self):
        db = PanelDatabase(self)
        db.add_server(1, is_main=1)
        node = Node(self, database=db)
        for attempt in range(5):
            for _ in range(3):
                db.signal(1)
            winners = []

            def claim(winners=winners):
                panel = xcvm_update.PanelConfig(os.path.join(node.root, "config", "config.ini"))
                database = xcvm_update.Database(panel)
                ids = database.claim_update_signals(lambda ids, force: None)
                database.close()
                if ids:
                    winners.append(ids)
            threads = [threading.Thread(target=claim) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            self.assertEqual(len(winners), 1, f"attempt {attempt}: {winners!r}")
            self.assertEqual(len(winners[0]), 3)
            self.assertEqual(db.signals(), ())

    def test_claim_is_kept_when_github_is_down_and_retried_later(self):
        node, db, github = main_node(self)
        publish(node, github, "1.1.0")
        db.signal(1)
        github.rate_limited = True
        result = node.run("--api-base", github.api_base, "poll")
        self.assertEqual(result.code, 1, result)
        self.assertIn("rate limit", result.err)
        self.assertEqual(db.signals(), (), "the signal was claimed")
        request = node.state_json("request.json")
        self.assertGreater(request["not_before"], 0)
        self.assertEqual(node.run("--api-base", github.api_base, "poll").code, 0, "waits for the reset time")
        self.assertEqual(node.version(), "1.0.0")
        request["not_before"] = 0
        xcvm_update.write_json_atomic(os.path.join(node.state, "request.json"), request)
        github.rate_limited = False
        result = node.run("--api-base", github.api_base, "poll")
        self.assertEqual(result.code, 0, result)
        self.assertEqual(node.version(), "1.1.0")
        self.assertFalse(os.path.exists(os.path.join(node.state, "request.json")))

    def test_failure_memory(self):
        node, db, github = main_node(self)
        publish(node, github, "1.1.0")
        node.touch("fail-start", "1.1.0")
        db.signal(1)
        result = node.run("--api-base", github.api_base, "poll")
        self.assertEqual(result.code, 4, result)
        self.assertEqual(db.server_row(), ("1.0.0", 1))
        self.assertTrue(any("rolled back" in line for line in db.syslog()))
        db.signal(1)
        result = node.run("--api-base", github.api_base, "poll")
        self.assertEqual(result.code, 0, result)
        self.assertIn("not retrying 1.0.0 -> 1.1.0", result.err)
        self.assertEqual(node.version(), "1.0.0")
        node.remove("fail-start")
        db.signal(1, '{"action":"update","force":true}')
        result = node.run("--api-base", github.api_base, "poll")
        self.assertEqual(result.code, 0, result)
        self.assertEqual(node.version(), "1.1.0")

    def test_failure_memory_lets_a_newer_release_through(self):
        node, db, github = main_node(self)
        publish(node, github, "1.1.0")
        node.touch("fail-start", "1.1.0")
        db.signal(1)
        self.assertEqual(node.run("--api-base", github.api_base, "poll").code, 4)
        publish(node, github, "1.1.1")
        db.signal(1)
        result = node.run("--api-base", github.api_base, "poll")
        self.assertEqual(result.code, 0, result)
        self.assertEqual(node.version(), "1.1.1")


@needs_root
class PostUpdateTest(unittest.TestCase):

    def test_lb_eligibility_each_rule_on_its_own(self):
        node, db, _ = main_node(self)
        db.add_server(2)                                   # eligible
        db.add_server(3, enabled=0)                        # disabled
        db.add_server(4, status=4)                         # not online
        db.add_server(5, checked_ago=181)                  # not checked in within 180 s
        db.add_server(6, is_main=1)                        # another MAIN
        db.add_server(7)                                   # eligible, but already has one pending
        db.signal(7)
        db.add_server(8)                                   # eligible; its foreign signal does not count
        db.signal(8, '{"action":"restart_services"}')
        result = node.run("post-update")
        self.assertEqual(result.code, 0, result)
        pending = sorted(row[0] for row in db.signals() if row[1] == UPDATE)
        self.assertEqual(pending, [2, 7, 8])
        again = node.run("post-update")
        self.assertEqual(again.code, 0, again)
        self.assertEqual(sorted(row[0] for row in db.signals() if row[1] == UPDATE), [2, 7, 8], "duplicates")
        self.assertEqual(db.server_row(), ("1.0.0", 1))

    def test_auto_update_lbs_off(self):
        node, db, _ = main_node(self)
        db.add_server(2)
        db.execute("UPDATE settings SET auto_update_lbs = 0")
        self.assertEqual(node.run("post-update").code, 0)
        self.assertEqual(db.signals(), ())

    def test_an_lb_signals_nobody(self):
        db = PanelDatabase(self)
        db.add_server(1, is_main=1)
        db.add_server(2)
        db.add_server(3)
        node = Node(self, version="1.1.0", database=db, server_id=2, is_lb=True)
        self.assertEqual(node.run("post-update").code, 0)
        self.assertEqual(db.signals(), ())
        self.assertEqual(db.server_row(2), ("1.1.0", 1))

    def test_database_down_exits_1_and_says_pending(self):
        node = Node(self)
        result = node.run("post-update")
        self.assertEqual(result.code, 1)
        self.assertIn("cannot reach the database", result.err)
        self.assertNotIn("s3cret-db-pass", result.err)


@needs_root
class NodeConfigTest(unittest.TestCase):

    def broken(self, text, expected):
        node = Node(self)
        node.write("config/config.ini", text)
        result = node.run("poll")
        self.assertEqual(result.code, 1, result)
        errors = [line for line in result.err.splitlines() if line.startswith("error:")]
        self.assertEqual(len(errors), 1, result.err)
        self.assertIn("config.ini", errors[0])
        self.assertIn(expected, errors[0])

    def test_missing_file(self):
        node = Node(self)
        os.unlink(os.path.join(node.root, "config", "config.ini"))
        result = node.run("poll")
        self.assertEqual(result.code, 1, result)
        self.assertIn("cannot read {}".format(os.path.join(node.root, "config", "config.ini")), result.err)

    def test_missing_key(self):
        self.broken(b'[XC_VM]\nhostname = "h"\ndatabase = "d"\n[Encrypted]\nusername = "u"\n', "server_id")

    def test_not_a_number(self):
        self.broken(b'[XC_VM]\nhostname = "h"\ndatabase = "d"\nport = "abc"\nserver_id = 1\n'
                    b'[Encrypted]\nusername = "u"\n', "not a number")

    def test_not_an_ini_file(self):
        self.broken(b"hostname = h\n", "not a valid ini file")

    def test_quoted_and_bare_values(self):
        path = os.path.join(Node(self).dir, "c.ini")
        with open(path, "w") as handle:
            handle.write("[XC_VM]\nhostname = 10.0.0.1\ndatabase = 'xc_vm'\nport = \"3307\"\nserver_id = 4\n"
                         "is_lb = 1\n[Encrypted]\nusername = \"user\"\npassword = \"p'w\"\n")
        panel = xcvm_update.PanelConfig(path)
        self.assertEqual((panel.host, panel.database, panel.port, panel.server_id, panel.is_lb, panel.password),
                         ("10.0.0.1", "xc_vm", 3307, 4, True, "p'w"))
        self.assertNotIn("p'w", repr(panel))

    def test_unknown_updater_setting(self):
        node = Node(self, settings="colour = blue\n")
        result = node.run("status")
        self.assertEqual(result.code, 1)
        self.assertIn("unknown setting 'colour'", result.err)


if __name__ == "__main__":
    unittest.main()
