"""Archive safety (SPEC 7): every hostile class is rejected with exit 3, a
message naming the member, the service never stopped, and not one byte
changed inside or outside ROOT."""

import gzip
import os
import unittest

from tests.support import (
    VERSION_MEMBER,
    Node,
    file_sha256,
    needs_root,
    snapshot,
    tar_gz,
)


@needs_root
class HostileArchiveTest(unittest.TestCase):

    def reject(self, members, expected, settings="", compress=True, mangle=None):
        node = Node(self, settings=settings)
        archive = os.path.join(node.releases, "hostile.tar.gz")
        tar_gz(archive, [VERSION_MEMBER] + members, compress=compress)
        if mangle:
            mangle(archive)
        outside = snapshot(node.dir, skip=("root",))
        before = node.snapshot()
        result = node.run("install", archive, "sha256:" + file_sha256(archive))
        self.assertEqual(result.code, 3, result)
        errors = [line for line in result.err.splitlines() if line.startswith("error:")]
        self.assertEqual(len(errors), 1, result.err)
        self.assertIn(expected, errors[0])
        self.assertEqual(node.calls(), [], "the service was touched")
        self.assertEqual(node.snapshot(), before)
        self.assertEqual(snapshot(node.dir, skip=("root",)), outside)
        self.assertEqual(os.listdir(os.path.join(node.state, "txn")), [], "staging left behind")
        self.assertEqual(node.state_json("last_result.json")["step"], "rejected")
        return result

    def test_absolute_path(self):
        self.reject([("file", "/tmp/xcvm-escape-abs", b"x", 0o644)], "'/tmp/xcvm-escape-abs': absolute path")

    def test_dotdot_traversal(self):
        self.reject([("file", "www/../../escaped", b"x", 0o644)], "'..' in the path")

    def test_dotdot_at_the_start(self):
        self.reject([("file", "../escaped", b"x", 0o644)], "'..' in the path")

    def test_symlink_pointing_outside(self):
        self.reject([("symlink", "www/out", "../../..", 0o777)], "points outside the tree")

    def test_symlink_to_an_absolute_path(self):
        self.reject([("symlink", "www/etc", "/etc", 0o777)], "symlink to an absolute path")

    def test_symlink_then_file_through_it(self):
        self.reject([("symlink", "www/inc", "../includes", 0o777),
                     ("file", "www/inc/evil.php", b"<?php\n", 0o644)], "goes through the symlink 'www/inc'")

    def test_symlink_then_file_through_it_escaping(self):
        self.reject([("symlink", "www/up", "..", 0o777),
                     ("file", "www/up/../escaped", b"x", 0o644)], "'..' in the path")

    def test_symlink_chain(self):
        self.reject([("symlink", "www/a", "b", 0o777), ("symlink", "www/b", "../includes", 0o777)],
                    "goes through another symlink 'www/b'")

    def test_symlink_through_a_later_symlink_directory(self):
        self.reject([("symlink", "www/a", "d/x.php", 0o777), ("symlink", "www/d", "../includes", 0o777)],
                    "goes through another symlink 'www/d'")

    def test_hardlink(self):
        self.reject([("file", "www/a.php", b"x", 0o644), ("hardlink", "www/b.php", "www/a.php", 0o644)],
                    "'www/b.php' is a hardlink")

    def test_character_device(self):
        self.reject([("chr", "www/null", None, 0o666)], "'www/null' is a device file")

    def test_fifo(self):
        self.reject([("fifo", "www/pipe", None, 0o666)], "'www/pipe' is a FIFO")

    def test_duplicate_member(self):
        self.reject([("file", "www/a.php", b"1", 0o644), ("file", "./www/a.php", b"2", 0o644)], "duplicate member")

    def test_file_then_directory_of_the_same_name(self):
        self.reject([("file", "www/x", b"1", 0o644), ("file", "www/x/y", b"2", 0o644)],
                    "its parent 'www/x' is a file")

    def test_directory_then_file_of_the_same_name(self):
        self.reject([("dir", "www/d", None, 0o755), ("file", "www/d", b"2", 0o644)],
                    "a file where the archive has a directory")

    def test_too_many_members(self):
        members = [("file", f"www/f{n:03d}", b"", 0o644) for n in range(60)]
        self.reject(members, "more than 50 members", settings="max_members = 50\n")

    def test_total_size_over_the_limit(self):
        self.reject([("file", "www/big.bin", b"\0" * (3 << 20), 0o644)], "unpacks to more than 2 MB",
                    settings="max_unpacked_mb = 2\n")

    def test_decompression_bomb_after_the_tar(self):
        def append_bomb(path):
            with open(path, "ab") as handle:
                handle.write(gzip.compress(b"\0" * (40 << 20)))
        self.reject([], "after the end of the tar", mangle=append_bomb)

    def test_truncated_stream(self):
        def truncate(path):
            size = os.path.getsize(path)
            with open(path, "r+b") as handle:
                handle.truncate(size * 2 // 3)
        self.reject([("file", "www/blob.bin", os.urandom(200000), 0o644)], "truncated", mangle=truncate)

    def test_corrupt_stream(self):
        def corrupt(path):
            with open(path, "r+b") as handle:
                handle.seek(os.path.getsize(path) // 2)
                byte = handle.read(1)
                handle.seek(-1, 1)
                handle.write(bytes([byte[0] ^ 0xFF]))
        self.reject([("file", "www/blob.bin", os.urandom(200000), 0o644)], "archive", mangle=corrupt)

    def test_not_gzip(self):
        self.reject([], "not a valid gzip stream", compress=False)

    def test_random_bytes(self):
        def scramble(path):
            with open(path, "wb") as handle:
                handle.write(b"\x1f\x8b" + os.urandom(5000))
        self.reject([], "gzip", mangle=scramble)

    def test_member_naming_the_root_as_a_file(self):
        self.reject([("file", "./", b"x", 0o644)], "names the tree's root")


@needs_root
class GoodArchiveTest(unittest.TestCase):

    def test_relative_symlinks_inside_are_installed(self):
        node = Node(self)
        archive = os.path.join(node.releases, "links.tar.gz")
        sha = tar_gz(archive, [VERSION_MEMBER, ("dir", "./www/", None, 0o755),
                               ("file", "www/index.php", b"<?php\n", 0o644),
                               ("symlink", "www/home.php", "index.php", 0o777),
                               ("symlink", "includes/www", "../www", 0o777)])
        result = node.run("install", archive, sha)
        self.assertEqual(result.code, 0, result)
        self.assertEqual(os.readlink(os.path.join(node.root, "www/home.php")), "index.php")
        self.assertEqual(os.readlink(os.path.join(node.root, "includes/www")), "../www")

    def test_preserved_paths_are_not_extracted(self):
        node = Node(self)
        archive = os.path.join(node.releases, "preserved.tar.gz")
        sha = tar_gz(archive, [VERSION_MEMBER, ("file", "config/config.ini", b"[XC_VM]\nclobbered\n", 0o644),
                               ("file", "bin/php/bin/php", b"new php", 0o755),
                               ("file", "bin/nginx/conf/ssl.conf", b"new", 0o644),
                               ("file", "bin/nginx/conf/nginx.conf", b"new nginx.conf", 0o644)])
        before = node.snapshot()
        self.assertEqual(node.run("install", archive, sha).code, 0)
        after = node.snapshot()
        self.assertEqual(after["config/config.ini"], before["config/config.ini"])
        self.assertNotIn("bin/php/bin/php", after)
        self.assertNotIn("bin/nginx/conf/ssl.conf", after)
        self.assertNotEqual(after["bin/nginx/conf/nginx.conf"], before["bin/nginx/conf/nginx.conf"])

    def test_live_file_replaced_by_directory_and_back(self):
        node = Node(self)
        node.write("www/thing", b"a file today")
        before = node.snapshot()
        archive = os.path.join(node.releases, "swap.tar.gz")
        sha = tar_gz(archive, [VERSION_MEMBER, ("file", "www/thing/inner.php", b"<?php\n", 0o644)])
        self.assertEqual(node.run("install", archive, sha).code, 0)
        self.assertTrue(os.path.isdir(os.path.join(node.root, "www/thing")))
        self.assertEqual(node.run("rollback").code, 0)
        self.assertEqual(node.snapshot(), before)


if __name__ == "__main__":
    unittest.main()
