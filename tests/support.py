"""Real parts for the suites: panel trees in temp dirs, gzip tarballs, a
systemctl stand-in, a GitHub look-alike with faults, a throwaway MariaDB.

The command under test is XCVM_UPDATE_TARGET (xcvm_update.py by default, or
dist/xcvm_update.pyz), always run as a separate process, as cron and sudo do.
"""

import hashlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import unittest

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT)

import xcvm_update

TARGET = os.environ.get("XCVM_UPDATE_TARGET") or os.path.join(PROJECT, "xcvm_update.py")
TEST_USER = "xcvm-test"
IS_ROOT = os.geteuid() == 0
needs_root = unittest.skipUnless(IS_ROOT, "the install transaction runs as root")

BASE_FILES = {
    "www/index.php": b"<?php echo 'old';\n",
    "www/old_only.php": b"<?php // dropped by the new release\n",
    "includes/cli/tool.php": b"<?php\n",
    "bin/nginx/conf/nginx.conf": b"worker_processes 1;\n",
    "status": b"#!/bin/sh\n[ -e \"$(dirname \"$0\")/../fail-status\" ] && { echo status failed; exit 1; }\nexit 0\n",
}

STAND_IN = """#!/bin/sh
# systemctl stand-in: records calls; block-VERB pauses, fail-VERB fails (when
# the file is empty, or when its text occurs in the live constants.php)
here='{here}'
echo "$*" >> "$here/systemctl.calls"
while [ -e "$here/block-$1" ]; do sleep 0.05; done
if [ -e "$here/fail-$1" ]; then
  pattern=$(cat "$here/fail-$1")
  if [ -z "$pattern" ] || grep -q "$pattern" '{root}/www/constants.php' 2>/dev/null; then
    echo "stand-in: $1 told to fail" >&2; exit 1
  fi
fi
case "$1" in
  stop) rm -f "$here/active" ;;
  start) touch "$here/active" ;;
  is-active) [ -e "$here/active" ] && {{ echo active; exit 0; }}; echo inactive; exit 3 ;;
esac
exit 0
"""


def owner_spec():
    """The real second user that installed files must end up owned by."""
    if not IS_ROOT:
        return f"{os.geteuid()}:{os.getegid()}"
    try:
        import pwd

        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin",
                        TEST_USER], check=True)
    return f"{TEST_USER}:{TEST_USER}"


def snapshot(root, skip=(".xcvm-update",)):
    """Every path under root: kind, mode, owner, and bytes or link target."""
    tree = {}
    for directory, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(rel_dir, d)) not in skip]
        for name in dirs + files:
            path = os.path.join(directory, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                body = "-> " + os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as handle:
                    body = hashlib.sha256(handle.read()).hexdigest()
            else:
                body = None
            tree[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, body)
    return tree


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Result:
    def __init__(self, done):
        self.code = done.returncode
        self.out = done.stdout
        self.err = done.stderr

    def __repr__(self):
        return f"exit {self.code}\nstdout: {self.out}\nstderr: {self.err}"


class Node:
    """A panel node in a temp dir: ROOT, its config, the stand-in systemctl."""

    def __init__(self, test, version="1.0.0", content_files=30, database=None, server_id=1, is_lb=False,
                 settings="", tmpfs_size=None):
        self.test = test
        self.dir = tempfile.mkdtemp(prefix="xcvm-test-")
        test.addCleanup(shutil.rmtree, self.dir, True)
        self.root = os.path.join(self.dir, "root")
        if tmpfs_size:
            os.makedirs(self.root)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={tmpfs_size}", "tmpfs", self.root], check=True)
            test.addCleanup(subprocess.run, ["umount", "-l", self.root])
        self.state = os.path.join(self.root, ".xcvm-update")
        self.owner = owner_spec()
        files = dict(BASE_FILES)
        files["www/constants.php"] = b"<?php\ndefine('XC_VM_VERSION', '" + version.encode() + b"');\n"
        for rel, data in files.items():
            self.write(rel, data, 0o755 if rel == "status" else 0o644)
        for number in range(content_files):
            self.write(f"content/streams/{number:05d}.ts", b"segment %d\n" % number)
        self.write("bin/nginx/conf/custom.conf", b"# the operator's own\n")
        self.write("config/config.ini", b"[XC_VM]\nhostname = \"127.0.0.1\"\ndatabase = \"none\"\nport = 9\n"
                   b"server_id = 1\n[Encrypted]\nusername = \"nobody\"\npassword = \"s3cret-db-pass\"\n")
        if database is not None:
            xcvm_update.write_panel_config(os.path.join(self.root, "config", "config.ini"), database.server,
                                           database.name, server_id, is_lb)
        self.systemctl = os.path.join(self.dir, "systemctl")
        with open(self.systemctl, "w") as handle:
            handle.write(STAND_IN.format(here=self.dir, root=self.root))
        os.chmod(self.systemctl, 0o755)
        self.touch("active")
        self.settings = os.path.join(self.dir, "xcvm-update.ini")
        with open(self.settings, "w") as handle:
            handle.write("[xcvm-update]\nhealth_timeout = 2\nhttp_timeout = 2\ndownload_retries = 2\n" + settings)
        self.releases = os.path.join(self.dir, "releases")
        os.makedirs(self.releases)

    def write(self, rel, data, mode=0o644):
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
        os.chmod(path, mode)

    def touch(self, name, text=""):
        with open(os.path.join(self.dir, name), "w") as handle:
            handle.write(text)

    def remove(self, name):
        os.unlink(os.path.join(self.dir, name))

    def flags(self):
        return ["--root", self.root, "--settings", self.settings, "--systemctl", self.systemctl,
                "--owner", self.owner]

    def command(self, *args):
        return [sys.executable, TARGET] + self.flags() + list(args)

    def run(self, *args, env=None, timeout=120):
        environment = dict(os.environ, **(env or {}))
        if "GITHUB_TOKEN" not in (env or {}):
            environment.pop("GITHUB_TOKEN", None)
        done = subprocess.run(self.command(*args), check=False, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, env=environment, text=True)
        return Result(done)

    def start(self, *args, env=None):
        """The command as a background process (for races and kills)."""
        return subprocess.Popen(self.command(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(os.environ, **(env or {})), universal_newlines=True)

    def calls(self):
        try:
            with open(os.path.join(self.dir, "systemctl.calls")) as handle:
                return [line.strip() for line in handle]
        except FileNotFoundError:
            return []

    def active(self):
        return os.path.exists(os.path.join(self.dir, "active"))

    def snapshot(self):
        return snapshot(self.root)

    def version(self):
        return xcvm_update.tree_version(self.root)

    def state_json(self, name):
        with open(os.path.join(self.state, name)) as handle:
            return json.load(handle)

    def status(self):
        result = self.run("status", "--json")
        self.test.assertEqual(result.code, 0, result)
        return json.loads(result.out)

    def release(self, version, changes=None, removed=("www/old_only.php",), name="xc_vm.tar.gz"):
        """A good release archive of BASE_FILES plus changes; returns (path, sha256)."""
        files = dict(BASE_FILES)
        files["www/index.php"] = b"<?php echo 'new " + version.encode() + b"';\n"
        for rel in removed:
            files.pop(rel, None)
        files.update(changes or {})
        path = os.path.join(self.releases, name)
        xcvm_update.build_release(path, version, files)
        return path, file_sha256(path)

    def wait_for(self, predicate, what, timeout=30):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.test.fail("timed out waiting for " + what)
            time.sleep(0.02)


def file_sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def tar_gz(path, members, compress=True):
    """A tarball from (kind, name, payload, mode) rows, hostile ones included:
    kind is file, dir, symlink, hardlink, chr, fifo; payload is bytes or a
    link target."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for kind, name, payload, mode in members:
            info = tarfile.TarInfo(name)
            info.mode = mode
            info.mtime = 1700000000
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = payload
            tar.addfile(info)
    data = buffer.getvalue()
    if compress:
        import gzip

        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as handle:
        handle.write(data)
    return file_sha256(path)


VERSION_MEMBER = ("file", "www/constants.php", b"<?php define('XC_VM_VERSION', '9.9.9');\n", 0o644)


class PanelDatabase:
    """A throwaway panel database on the test MariaDB, dropped at cleanup."""

    _server = None

    @classmethod
    def server_for(cls, test):
        if cls._server is None:
            workdir = tempfile.mkdtemp(prefix="xcvm-mariadb-")
            cls._server = xcvm_update.database_server(workdir)
            if cls._server is None:
                raise unittest.SkipTest("no MariaDB answers and mariadbd is not installed")
        return cls._server

    def __init__(self, test):
        self.server = self.server_for(test)
        self.name = f"xcvm_test_{os.urandom(4).hex()}"
        self.conn = xcvm_update.create_panel_database(self.server, self.name)
        test.addCleanup(self.drop)

    def drop(self):
        self.execute(f"DROP DATABASE IF EXISTS `{self.name}`")
        if getattr(self, "test_cleanup_user", None):
            self.execute(self.test_cleanup_user)
        self.conn.close()

    def execute(self, sql, params=None):
        with self.conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()

    def private_user(self):
        """A database account of this test's own, that a test can lock."""
        self.user = "xt_" + os.urandom(4).hex()
        self.password = "pw-" + os.urandom(6).hex()
        self.execute(f"CREATE USER '{self.user}'@'%' IDENTIFIED BY '{self.password}'")
        self.execute(f"GRANT ALL ON `{self.name}`.* TO '{self.user}'@'%'")
        self.server = self.server[:2] + (self.user, self.password)
        self.test_cleanup_user = f"DROP USER IF EXISTS '{self.user}'@'%'"
        return self

    def lock_user(self, locked=True):
        self.execute("ALTER USER '{}'@'%' ACCOUNT {}".format(self.user, "LOCK" if locked else "UNLOCK"))

    def add_server(self, server_id, is_main=0, enabled=1, status=1, checked_ago=5, version="1.0.0"):
        self.execute("INSERT INTO servers (id, server_name, is_main, enabled, status, last_check_ago, xc_vm_version)"
                     " VALUES (%s, %s, %s, %s, %s, UNIX_TIMESTAMP() - %s, %s)",
                     (server_id, f"server-{server_id}", is_main, enabled, status, checked_ago, version))

    def signal(self, server_id, data='{"action":"update"}', cache=0):
        self.execute("INSERT INTO signals (server_id, time, custom_data, cache) VALUES (%s, UNIX_TIMESTAMP(), %s, %s)",
                     (server_id, data, cache))

    def signals(self):
        return self.execute("SELECT server_id, custom_data, cache FROM signals ORDER BY signal_id")

    def syslog(self):
        return [row[0] for row in self.execute("SELECT error FROM mysql_syslog ORDER BY id")]

    def server_row(self, server_id=1):
        return self.execute("SELECT xc_vm_version, status FROM servers WHERE id = %s", (server_id,))[0]


class FakeGitHub(xcvm_update.ReleaseServer):
    """The demo's GitHub look-alike plus the faults the real one shows."""

    def __init__(self, test, folder):
        xcvm_update.ReleaseServer.__init__(self, "Vateron-Media/XC_VM", folder)
        test.addCleanup(self.close)
        self.rate_limited = False
        self.malformed = False
        self.hang_api = False
        self.cut_at = []          # drop the asset connection after these many bytes, once each
        self.ignore_range = False
        self.corrupt = False
        self.extra_bytes = 0

    def handle(self, request):
        api = request.server.server_port == self.api.server_port
        if api and self.hang_api:
            time.sleep(6)
            return None
        if api and self.rate_limited:
            return self.reply(request, 403, b'{"message": "API rate limit exceeded"}', {
                "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(time.time()) + 600)})
        if api and self.malformed and "/releases" in request.path and "/download/" not in request.path:
            return self.reply(request, 200, b'[{"tag_name": "v2.0.0", "assets": [')
        return xcvm_update.ReleaseServer.handle(self, request)

    def send_file(self, request, path):
        faulty = self.cut_at or self.corrupt or self.extra_bytes or self.ignore_range
        if not faulty or not os.path.exists(path):
            return xcvm_update.ReleaseServer.send_file(self, request, path)
        with open(path, "rb") as handle:
            data = handle.read()
        start = 0
        ranged = request.headers.get("Range", "").startswith("bytes=") and not self.ignore_range
        if ranged:
            start = int(request.headers["Range"][6:].rstrip("-"))
        body = bytearray(data[start:])
        if self.corrupt and body:
            body[len(body) // 2] ^= 0xFF
        body += b"\0" * self.extra_bytes
        request.send_response(206 if ranged else 200)
        request.send_header("Content-Length", str(len(body)))
        if ranged:
            request.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        request.end_headers()
        if self.cut_at:
            cut = self.cut_at.pop(0) - start
            request.wfile.write(bytes(body[:max(cut, 0)]))
            request.wfile.flush()
            request.connection.shutdown(socket.SHUT_RDWR)
            request.close_connection = True
            return None
        request.wfile.write(bytes(body))
        return None
