"""xcvm-update: the updater of the XC_VM IPTV panel.

One MAIN node and many load balancers (LBs) share the MAIN's MariaDB.  An admin
clicking *Update* inserts a ``signals`` row; every node's cron runs ``poll``,
which walks the pipeline below.  Each stage is one section of this file, in
this order::

    config      settings (flags > /etc/xcvm-update.ini > defaults), config.ini
    database    signals, servers, settings, mysql_syslog (PyMySQL, lazily)
    releases    GitHub releases API: channel, version order, asset, hash
    download    streaming SHA-256, redirects, retries, Range resume
    archive     validate every tar member, extract into a staging tree
    transaction lock + journal: verify, stage, stop, swap, gate, commit,
                or roll back; crash recovery from the journal
    commands    poll -> update -> install -> post-update, check, status,
                rollback
    demo        a sandbox panel, releases, a GitHub look-alike, a database
                (the tests reuse these parts)
    cli         argparse, exit codes

    [admin] -> signals {"action":"update"}
       poll   (cron, root)   recover / finalize, claim the signal
       update                node type, release, download + SHA-256, status=5
       install (root)        copy+hash, stage (panel still up), stop, rename
                             swap, obsolete files, daemon-reload, nginx -t,
                             start, health gate, commit   | any failure:
                                                         | restore, start old
       post-update           version in DB, LB signals, mark complete

Nothing here trusts its input: the archive is re-hashed from a private copy,
every member is validated by our own rules before it is written, and the live
tree only ever changes by rename(2) of fully written files, recorded in a
journal so that a crash at any instant is undone or completed by the next run.
"""

import argparse
import configparser
import errno
import fcntl
import hashlib
import json
import os
import posixpath
import re
import shlex
import signal
import stat
import sys
import threading
import time

# PyMySQL, subprocess, shutil, tarfile and the HTTP modules are imported where
# they are used: poll runs every minute on every node and mostly needs none.

__version__ = "1.0.0"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_ROLLED_BACK = 4
EXIT_ROLLBACK_FAILED = 5
EXIT_BUSY = 75
EXIT_UPDATE_AVAILABLE = 100

EXIT_CODES_HELP = """exit codes:
  0    done, or nothing to do
  1    error (the message says what and what to do)
  2    usage error
  3    rejected before any change (bad hash, archive or metadata)
  4    failed after the service stopped and was rolled back; the old version runs
  5    rollback failed: operator action needed (the message says what)
  75   busy: another update holds the lock
  100  check only: an update is available
"""

# Node-local data and binaries that an update never installs over (SPEC 4).
DEFAULT_PRESERVED = (
    "bin/ffmpeg_bin", "bin/nginx_rtmp", "bin/php", "bin/redis", "bin/install",
    "bin/maxmind", "bin/certbot", "content", "backups", "tmp", "config",
    "signals", "bin/nginx/sbin", "bin/nginx/modules", "bin/nginx/logs",
    "bin/nginx/conf/ports", "bin/nginx/conf/servers", "bin/nginx/conf/codes",
    "bin/nginx/conf/ssl.conf", "bin/nginx/conf/server.crt",
    "bin/nginx/conf/server.key", "bin/nginx/conf/custom.conf",
    "bin/nginx/conf/balance.conf", "bin/nginx/conf/limit.conf",
    "bin/nginx/conf/limit_queue.conf", "bin/nginx/conf/realip_cdn.conf",
    "bin/nginx/conf/realip_cloudflare.conf", "bin/nginx/conf/realip_xc_vm.conf",
    "bin/nginx/conf/gzip.conf",
)

# Files whose first define('XC_VM_VERSION', '...') names a tree's version.
VERSION_FILES = ("www/constants.php", "www/stream/init.php", "core/Config/AppConfig.php")
VERSION_DEFINE = re.compile(rb"""define\(\s*['"]XC_VM_VERSION['"]\s*,\s*['"]([^'"]+)['"]""")

WORK_DIR_NAME = ".xcvm-update-work"   # under ROOT when the state dir is on another filesystem
UPDATE_ACTION = "update"
UPDATE_SIGNAL = json.dumps({"action": UPDATE_ACTION}, separators=(",", ":"))   # as the panel writes it
CHUNK = 1 << 20


class UpdateError(Exception):
    """An error with the exit code it maps to; str() is the one-line message."""

    exit_code = EXIT_ERROR


class Rejected(UpdateError):
    exit_code = EXIT_REJECTED


class RolledBack(UpdateError):
    exit_code = EXIT_ROLLED_BACK


class RollbackFailed(UpdateError):
    exit_code = EXIT_ROLLBACK_FAILED


class Busy(UpdateError):
    exit_code = EXIT_BUSY


class DatabaseUnavailable(UpdateError):
    pass


# --------------------------------------------------------------------- config

SETTINGS_DEFAULTS = {
    "root": "/home/xc_vm",
    "config": None,            # ROOT/config/config.ini
    "state_dir": None,         # ROOT/.xcvm-update
    "owner": "xc_vm:xc_vm",
    "service": "xc_vm",
    "systemctl": "systemctl",
    "api_base": "https://api.github.com",
    "repo": "Vateron-Media/XC_VM",
    "channel": None,           # settings.update_channel, else stable
    "github_token": None,
    "keep_backups": "1",
    "health_url": None,
    "health_timeout": "60",
    "main_asset": "xc_vm.tar.gz",
    "lb_asset": "loadbalancer.tar.gz",
    "preserve": None,          # one path per line; DEFAULT_PRESERVED
    "max_members": "100000",
    "max_unpacked_mb": "4096",
    "http_timeout": "30",
    "download_retries": "4",
}


class Settings:
    """Every knob, resolved once: command line > settings file > default."""

    def __init__(self, values):
        get = values.get
        self.root = os.path.abspath(get("root"))
        self.config = get("config") or os.path.join(self.root, "config", "config.ini")
        self.state_dir = os.path.abspath(get("state_dir") or os.path.join(self.root, ".xcvm-update"))
        self.owner = get("owner")
        self.service = get("service")
        self.systemctl = shlex.split(get("systemctl"))
        self.api_base = get("api_base").rstrip("/")
        self.repo = get("repo")
        self.channel = get("channel")
        self.github_token = get("github_token") or os.environ.get("GITHUB_TOKEN") or None
        self.health_url = get("health_url")
        self.main_asset = get("main_asset")
        self.lb_asset = get("lb_asset")
        self.keep_backups = _int_setting(values, "keep_backups", minimum=0)
        self.health_timeout = _int_setting(values, "health_timeout", minimum=1)
        self.max_members = _int_setting(values, "max_members", minimum=1)
        self.max_unpacked = _int_setting(values, "max_unpacked_mb", minimum=1) << 20
        self.http_timeout = _int_setting(values, "http_timeout", minimum=1)
        self.download_retries = _int_setting(values, "download_retries", minimum=0)
        preserve = get("preserve")
        paths = preserve.split() if preserve else DEFAULT_PRESERVED
        self.preserved = {p.strip("/") for p in paths}
        if self.channel not in (None, "stable", "beta"):
            raise UpdateError(f"channel must be 'stable' or 'beta', not {self.channel!r}: fix --channel or the settings file")
        if self.repo.count("/") != 1:
            raise UpdateError(f"repo must look like OWNER/NAME, not {self.repo!r}")
        self.preserved.add(WORK_DIR_NAME)
        state_rel = os.path.relpath(self.state_dir, self.root)
        if not state_rel.startswith(".."):
            self.preserved.add(state_rel)

    @property
    def download_path(self):
        return os.path.join(self.root, "tmp", ".update.tar.gz")

    def state(self, *names):
        return os.path.join(self.state_dir, *names)


def _int_setting(values, key, minimum):
    try:
        number = int(values[key])
    except (TypeError, ValueError):
        raise UpdateError(f"setting {key} must be a whole number, not {values[key]!r}")
    if number < minimum:
        raise UpdateError(f"setting {key} must be at least {minimum}")
    return number


def load_settings(args):
    """Merge the command line over /etc/xcvm-update.ini over the defaults."""
    values = dict(SETTINGS_DEFAULTS)
    path = args.settings or "/etc/xcvm-update.ini"
    if args.settings or os.path.exists(path):
        parser = _read_ini(path)
        if parser.has_section("xcvm-update"):
            for key, value in parser.items("xcvm-update"):
                key = key.replace("-", "_")
                if key not in values:
                    raise UpdateError(f"{path}: unknown setting {key!r} in [xcvm-update]; see README, Configuration")
                values[key] = _unquote(value)
    for key in values:
        flag = getattr(args, key, None)
        if flag is not None and key != "github_token":
            values[key] = flag
    return Settings(values)


def _read_ini(path):
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            parser.read_file(handle)
    except OSError as error:
        raise UpdateError(f"cannot read {path}: {error.strerror}")
    except configparser.Error as error:
        raise UpdateError(f"{path} is not a valid ini file: {str(error).splitlines()[0]}")
    return parser


def _unquote(value):
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


class PanelConfig:
    """ROOT/config/config.ini, written by the panel's installer; read only."""

    def __init__(self, path):
        parser = _read_ini(path)
        self.path = path

        def get(section, key, default=None):
            if parser.has_option(section, key):
                return _unquote(parser.get(section, key))
            if default is None:
                raise UpdateError(f"{path}: missing [{section}] {key}; the panel's installer writes it")
            return default

        self.host = get("XC_VM", "hostname")
        self.database = get("XC_VM", "database")
        self.user = get("Encrypted", "username")
        self.password = get("Encrypted", "password", "")
        try:
            self.port = int(get("XC_VM", "port", "3306"))
            self.server_id = int(get("XC_VM", "server_id"))
            self.is_lb = bool(int(get("XC_VM", "is_lb", "0")))
        except ValueError as error:
            raise UpdateError(f"{path}: [XC_VM] has a value that is not a number ({error})")

    def __repr__(self):  # never the password
        return f"PanelConfig({self.user}@{self.host}:{self.port}/{self.database}, server_id={self.server_id})"


class Log:
    """Timestamped lines to STATE/update.log (when writable) and to stderr."""

    def __init__(self, path=None, verbosity=1):
        self.verbosity = verbosity
        self.file = None
        if path:
            try:
                self.file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115  closed by main()
            except OSError:
                self.file = None

    def _write(self, level, message, min_verbosity):
        if self.file:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            self.file.write(f"{stamp} {level} {message}\n")
        if self.verbosity >= min_verbosity:
            sys.stderr.write((f"{level.lower()}: {message}\n") if level != "INFO" else message + "\n")

    def debug(self, message):
        self._write("DEBUG", message, 2)

    def info(self, message):
        self._write("INFO", message, 1)

    def warning(self, message):
        self._write("WARNING", message, 1)

    def error(self, message):
        self._write("ERROR", message, 0)

    def quiet_info(self, message):
        """Recorded in the log file only (cron mails whatever reaches stderr)."""
        self._write("INFO", message, 3)


# ------------------------------------------------------------------- database

class Database:
    """The panel's MariaDB, through PyMySQL (imported here and only here)."""

    def __init__(self, panel):
        import pymysql  # lazily: --help, check and install must start fast

        self.panel = panel
        self.server_id = panel.server_id
        try:
            self.conn = pymysql.connect(
                host=panel.host, port=panel.port, user=panel.user, password=panel.password,
                database=panel.database, connect_timeout=5, read_timeout=30, write_timeout=30,
                autocommit=True, charset="utf8mb4")
        except pymysql.Error as error:
            raise DatabaseUnavailable(f"cannot reach the database {panel.host}:{panel.port}/{panel.database}: {_db_error_text(error)}")

    def close(self):
        self.conn.close()

    def query(self, sql, params=()):
        with self.conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()

    def execute(self, sql, params=()):
        with self.conn.cursor() as cursor:
            return cursor.execute(sql, params)

    # -- signals
    def pending_update_signals(self):
        """This node's update signals; one cheap SELECT for poll's fast path."""
        rows = self.query(
            "SELECT signal_id, custom_data FROM signals"
            " WHERE server_id = %s AND cache = 0 AND custom_data LIKE %s",
            (self.server_id, "%" + UPDATE_ACTION + "%"))
        return [(sid, data) for sid, data in rows if _signal_action(data)[0] == UPDATE_ACTION]

    def claim_update_signals(self, record_claim):
        """Atomically take this node's update signals; other actions stay.

        record_claim(ids, force) runs while the rows are locked and before they
        are deleted, so a crash never loses a claimed signal (at worst one is
        seen twice, and the second update finds nothing newer to install).
        """
        self.conn.begin()
        try:
            rows = self.query(
                "SELECT signal_id, custom_data FROM signals"
                " WHERE server_id = %s AND cache = 0 AND custom_data LIKE %s FOR UPDATE",
                (self.server_id, "%" + UPDATE_ACTION + "%"))
            mine = [(sid, _signal_action(data)[1]) for sid, data in rows
                    if _signal_action(data)[0] == UPDATE_ACTION]
            if not mine:
                self.conn.rollback()
                return []
            ids = [sid for sid, _ in mine]
            record_claim(ids, any(force for _, force in mine))
            self.execute("DELETE FROM signals WHERE signal_id IN ({})".format(",".join(["%s"] * len(ids))), ids)
            self.conn.commit()
            return ids
        except BaseException:
            self.conn.rollback()
            raise

    # -- servers and settings
    def is_main(self):
        rows = self.query("SELECT is_main FROM servers WHERE id = %s", (self.server_id,))
        if not rows:
            raise UpdateError(f"server_id {self.server_id} from {self.panel.path} is not in the servers table")
        return bool(rows[0][0])

    def update_channel(self):
        rows = self.query("SELECT update_channel FROM settings LIMIT 1")
        channel = rows[0][0] if rows and rows[0][0] else "stable"
        return channel if channel in ("stable", "beta") else "stable"

    def set_status(self, status):
        self.execute("UPDATE servers SET status = %s WHERE id = %s", (status, self.server_id))

    def set_installed(self, version):
        self.execute("UPDATE servers SET xc_vm_version = %s, status = 1 WHERE id = %s", (version, self.server_id))

    def recorded_version(self):
        rows = self.query("SELECT xc_vm_version FROM servers WHERE id = %s", (self.server_id,))
        return rows[0][0] if rows and rows[0][0] else None

    def propagate_to_lbs(self):
        """One update signal per eligible LB, in one statement and transaction.

        Eligible: enabled, online (status 1), checked in within 180 s, not MAIN,
        and no update signal already pending.  Returns the number inserted.
        """
        auto = self.query("SELECT auto_update_lbs FROM settings LIMIT 1")
        if not auto or not auto[0][0]:
            return 0
        self.conn.begin()
        try:
            inserted = self.execute(
                "INSERT INTO signals (server_id, rtmp, time, custom_data, cache)"
                " SELECT s.id, 0, UNIX_TIMESTAMP(), %s, 0 FROM servers s"
                " WHERE s.enabled = 1 AND s.status = 1 AND s.is_main = 0 AND s.id <> %s"
                " AND s.last_check_ago >= UNIX_TIMESTAMP() - 180"
                " AND NOT EXISTS (SELECT 1 FROM signals g WHERE g.server_id = s.id AND g.cache = 0"
                "   AND g.custom_data LIKE %s"
                "   AND CASE WHEN JSON_VALID(g.custom_data)"
                "       THEN JSON_UNQUOTE(JSON_EXTRACT(g.custom_data, '$.action')) END = %s)",
                (UPDATE_SIGNAL, self.server_id, "%" + UPDATE_ACTION + "%", UPDATE_ACTION))
            self.conn.commit()
            return inserted
        except BaseException:
            self.conn.rollback()
            raise

    def syslog(self, message):
        self.execute(
            "INSERT INTO mysql_syslog (type, error, username, ip, `database`, date, server_id)"
            " VALUES ('UPDATE', %s, 'xcvm-update', '', '', UNIX_TIMESTAMP(), %s)",
            (message, self.server_id))


def _signal_action(custom_data):
    """(action, force) of a signal's custom_data, or (None, False)."""
    try:
        data = json.loads(custom_data)
    except (TypeError, ValueError):
        return None, False
    if not isinstance(data, dict):
        return None, False
    return data.get("action"), bool(data.get("force"))


def _db_error_text(error):
    args = getattr(error, "args", ())
    return str(args[1]) if len(args) > 1 else str(error)


# ------------------------------------------------------------------- releases

VERSION_PATTERN = re.compile(r"^[vV]?(\d+(?:\.\d+)*)(?:[-.]?(alpha|a|beta|b|rc)\.?(\d*))?$")
PRERELEASE_RANK = {"alpha": 0, "a": 0, "beta": 1, "b": 1, "rc": 2}


def version_key(tag):
    """Sort key of a tag: v2.10.0 > v2.9.3 > 2.9.3-rc1 > 2.9.3-beta2; None if unparsable."""
    match = VERSION_PATTERN.match((tag or "").strip())
    if not match:
        return None
    numbers = [int(part) for part in match.group(1).split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    if match.group(2):
        pre = (0, PRERELEASE_RANK[match.group(2).lower()], int(match.group(3) or 0))
    else:
        pre = (1, 0, 0)
    return (tuple(numbers), pre)


def is_newer(candidate, installed):
    """True when candidate is a strictly newer version than installed."""
    new, old = version_key(candidate), version_key(installed)
    if new is None:
        return False
    return old is None or new > old


def tree_version(root):
    """The version a panel tree declares (SPEC 6, step 0), or None."""
    for name in VERSION_FILES:
        try:
            with open(os.path.join(root, name), "rb") as handle:
                match = VERSION_DEFINE.search(handle.read(1 << 20))
        except OSError:
            continue
        if match:
            return match.group(1).decode("utf-8", "replace")
    return None


class HttpClient:
    """GET over http.client: redirects followed by hand so that the token never
    goes to the asset host, timeouts on connect and read, plain errors."""

    def __init__(self, token=None, timeout=30):
        self.token = token
        self.timeout = timeout

    def open(self, url, headers=None, authorize=True):
        import http.client
        import urllib.parse

        headers = dict(headers or {})
        headers.setdefault("User-Agent", "xcvm-update/" + __version__)
        origin = urllib.parse.urlsplit(url).netloc
        for _ in range(8):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme == "https":
                connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=self.timeout)
            elif parts.scheme == "http":
                connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout)
            else:
                raise UpdateError(f"refusing URL scheme {parts.scheme!r} in {_redact_url(url)}")
            sent = dict(headers)
            if self.token and authorize and parts.netloc == origin:
                sent["Authorization"] = "Bearer " + self.token
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            try:
                connection.request("GET", path, headers=sent)
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                raise TransientError(f"cannot reach {parts.netloc}: {_error_text(error)}")
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                response.read()
                connection.close()
                if not location:
                    raise UpdateError(f"{parts.netloc} answered a redirect without a Location")
                target = urllib.parse.urljoin(url, location)
                if parts.scheme == "https" and not target.startswith("https:"):
                    raise UpdateError(f"refusing a redirect from https to {_redact_url(target)}")
                url = target
                continue
            return connection, response
        raise UpdateError(f"too many redirects fetching {_redact_url(url)}")


class TransientError(UpdateError):
    """Network trouble or a rate limit: worth retrying later."""

    def __init__(self, message, retry_at=None):
        UpdateError.__init__(self, message)
        self.retry_at = retry_at


def _redact_url(url):
    return url.split("?", 1)[0]


def describe_os_error(error, doing):
    """One line for an OSError: what we were doing, what failed, what to do."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left while {doing} ({error.filename or ''}): free space and retry"
    where = f" ({error.filename})" if error.filename else ""
    return f"{doing} failed: {error.strerror or error}{where}"


def _error_text(error):
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


class Release:
    """The chosen release asset: where to get it and what its hash must be."""

    def __init__(self, tag, asset_name, url, size, hash_spec, weak):
        self.tag = tag
        self.asset_name = asset_name
        self.url = url
        self.size = size
        self.hash_spec = hash_spec   # "sha256:HEX" or "md5:HEX"
        self.weak = weak


class ReleaseSource:
    """GET {api-base}/repos/{repo}/releases, cached with its ETag."""

    def __init__(self, settings, log, http, write_cache=True):
        self.settings = settings
        self.log = log
        self.http = http
        self.write_cache = write_cache

    def list_releases(self):
        url = f"{self.settings.api_base}/repos/{self.settings.repo}/releases?per_page=100"
        cache_path = self.settings.state("releases-cache.json")
        cached = _read_json(cache_path) or {}
        if cached.get("url") != url:
            cached = {}
        headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}
        if cached.get("etag"):
            headers["If-None-Match"] = cached["etag"]
        connection, response = self.http.open(url, headers)
        try:
            body = response.read()
        except OSError as error:
            raise TransientError(f"release list from {_redact_url(url)} cut off: {_error_text(error)}")
        finally:
            connection.close()
        if response.status == 304 and "body" in cached:
            self.log.debug("release list unchanged (ETag {})".format(cached["etag"]))
            body = cached["body"].encode("utf-8")
        elif response.status in (403, 429):
            raise _rate_limit_error(response)
        elif response.status != 200:
            raise TransientError(f"GitHub answered HTTP {response.status} for {_redact_url(url)}; check --repo and --api-base")
        try:
            releases = json.loads(body)
        except ValueError:
            raise Rejected(f"the release list from {_redact_url(url)} is not valid JSON")
        if not isinstance(releases, list) or not all(isinstance(r, dict) for r in releases):
            raise Rejected(f"the release list from {_redact_url(url)} is not a JSON list of releases")
        etag = response.getheader("ETag")
        if response.status == 200 and etag and self.write_cache:
            _write_json_quietly(cache_path, {"url": url, "etag": etag, "body": body.decode("utf-8")})
        return releases

    def choose(self, releases, channel, wanted_tag=None):
        """The newest eligible release (or the wanted tag) as (tag, release)."""
        candidates = []
        for release in releases:
            tag = release.get("tag_name")
            if release.get("draft") or not isinstance(tag, str):
                continue
            if wanted_tag is not None:
                if version_key(tag) is not None and version_key(tag) == version_key(wanted_tag) or tag == wanted_tag:
                    return tag, release
                continue
            if channel == "stable" and release.get("prerelease"):
                continue
            key = version_key(tag)
            if key is None:
                self.log.debug(f"skipping release tag {tag!r}: not a version")
                continue
            candidates.append((key, tag, release))
        if wanted_tag is not None:
            raise Rejected(f"release {wanted_tag} is not among the published releases of {self.settings.repo}")
        if not candidates:
            raise Rejected(f"no {channel} release of {self.settings.repo} was found")
        _, tag, release = max(candidates, key=lambda item: item[0])
        return tag, release

    def asset(self, tag, release, asset_name):
        """The Release to download: its URL, size and the expected hash."""
        assets = release.get("assets")
        if not isinstance(assets, list):
            raise Rejected(f"release {tag} has no assets list")
        by_name = {a.get("name"): a for a in assets if isinstance(a, dict)}
        asset = by_name.get(asset_name)
        if not asset or not asset.get("browser_download_url"):
            raise Rejected(f"release {tag} has no asset {asset_name}")
        size = asset.get("size")
        if not isinstance(size, int) or size <= 0:
            raise Rejected(f"release {tag}: asset {asset_name} has no valid size")
        url = asset["browser_download_url"]
        digest = asset.get("digest")
        if isinstance(digest, str) and digest.startswith("sha256:"):
            return Release(tag, asset_name, url, size, parse_hash(digest), weak=False)
        for hash_asset, algorithm in (("hashes.sha256", "sha256"), ("hashes.md5", "md5")):
            if hash_asset in by_name:
                listed = self._hash_from_list(by_name[hash_asset], asset_name, tag)
                if listed:
                    if algorithm == "md5":
                        self.log.warning(f"release {tag} publishes only an MD5 for {asset_name}: accepted, but MD5 is weak")
                    return Release(tag, asset_name, url, size, parse_hash(algorithm + ":" + listed), weak=algorithm == "md5")
        raise Rejected(f"release {tag}: no hash for {asset_name} (no digest, no hashes.sha256 or hashes.md5 line)")

    def _hash_from_list(self, hash_asset, asset_name, tag):
        url = hash_asset.get("browser_download_url")
        if not url:
            return None
        connection, response = self.http.open(url)
        try:
            if response.status != 200:
                name = hash_asset.get("name")
                raise TransientError(f"fetching {name} of release {tag}: HTTP {response.status}")
            text = response.read(1 << 20).decode("utf-8", "replace")
        except OSError as error:
            raise TransientError("fetching {} of release {}: {}".format(hash_asset.get("name"), tag, _error_text(error)))
        finally:
            connection.close()
        for line in text.splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[-1].lstrip("*") == asset_name:
                return fields[0]
        return None


def _rate_limit_error(response):
    reset = response.getheader("X-RateLimit-Reset")
    retry_after = response.getheader("Retry-After")
    now = time.time()
    if retry_after and retry_after.isdigit():
        retry_at = now + int(retry_after)
    elif reset and reset.isdigit():
        retry_at = int(reset)
    else:
        retry_at = now + 3600
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(retry_at))
    return TransientError(
        f"GitHub rate limit reached (HTTP {response.status}): retry after {when} (in {max(1, int((retry_at - now + 59) // 60))} min); a github_token raises the limit", retry_at=retry_at)


def parse_hash(text):
    """'sha256:HEX', 'md5:HEX' or a bare hex (64 = sha256, 32 = md5)."""
    text = (text or "").strip().lower()
    algorithm, _, digest = text.rpartition(":")
    if not algorithm:
        algorithm = {64: "sha256", 32: "md5"}.get(len(digest), "")
    lengths = {"sha256": 64, "md5": 32}
    if algorithm not in lengths or len(digest) != lengths[algorithm] or not re.match("^[0-9a-f]+$", digest):
        raise Rejected(f"bad hash {text[:80]!r}: give sha256:HEX, md5:HEX, or a bare 64- or 32-digit hex")
    return algorithm + ":" + digest


# ------------------------------------------------------------------- download

class Downloader:
    """Stream a URL to a file with SHA-256 (and MD5 when asked) in the same pass.

    Dropped connections are resumed with Range after a backoff; a server that
    ignores Range restarts the file; bytes past the declared size stop it.
    """

    def __init__(self, http, log, retries, progress=False):
        self.http = http
        self.log = log
        self.retry_delays = [min(2 ** attempt, 30) for attempt in range(retries)]
        self.progress = progress

    def fetch(self, url, path, size, expected):
        algorithm, want = expected.split(":", 1)
        state = _HashingFile(path, algorithm)
        try:
            for attempt in range(len(self.retry_delays) + 1):
                try:
                    self._attempt(url, state, size)
                    break
                except TransientError as error:
                    if attempt == len(self.retry_delays):
                        raise
                    delay = self.retry_delays[attempt]
                    self.log.warning(f"{error}; retrying in {delay}s from byte {state.length}")
                    time.sleep(delay)
            if size is not None and state.length != size:
                raise Rejected(f"download of {_redact_url(url)} ended at {state.length} bytes, the release declares {size}")
            sha256, other = state.finish()
        except BaseException:
            state.discard()
            raise
        got = sha256 if algorithm == "sha256" else other
        if got != want:
            _unlink_quietly(path)
            raise Rejected(f"{algorithm} hash mismatch for {_redact_url(url)}: expected {want}, got {got}; the file was deleted")
        return sha256

    def _attempt(self, url, state, size):
        headers = {"Accept": "application/octet-stream"}
        if state.length:
            headers["Range"] = f"bytes={state.length}-"
        connection, response = self.http.open(url, headers)
        try:
            if response.status == 200 and state.length:
                self.log.info("server ignored the resume request: starting over")
                state.restart()
            elif response.status == 206:
                if not (response.getheader("Content-Range") or "").startswith(f"bytes {state.length}-"):
                    raise Rejected("server resumed {} at the wrong offset ({})".format(
                        _redact_url(url), response.getheader("Content-Range")))
            elif response.status in (403, 429):
                raise _rate_limit_error(response)
            elif response.status == 416 and size is not None and state.length == size:
                return
            elif response.status != 200:
                raise TransientError(f"download of {_redact_url(url)}: HTTP {response.status}")
            buffer = bytearray(CHUNK)
            view = memoryview(buffer)
            last_draw = 0.0
            while True:
                try:
                    count = response.readinto(buffer)
                except OSError as error:
                    raise TransientError(f"download of {_redact_url(url)} cut off: {_error_text(error)}")
                if not count:
                    break
                if size is not None and state.length + count > size:
                    raise Rejected(f"download of {_redact_url(url)} goes past the declared {size} bytes: refused")
                state.write(view[:count])
                if self.progress and time.monotonic() - last_draw > 0.2:
                    last_draw = time.monotonic()
                    _draw_progress(state.length, size)
            if self.progress:
                _draw_progress(state.length, size)
                sys.stderr.write("\n")
            if size is not None and state.length < size:
                raise TransientError(f"download of {_redact_url(url)} cut off at {state.length} of {size} bytes")
        finally:
            connection.close()


class _HashingFile:
    """The file being downloaded and the running hashes of what it holds."""

    def __init__(self, path, algorithm):
        self.path = path
        self.algorithm = algorithm
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.restart()

    def restart(self):
        if getattr(self, "handle", None):
            self.handle.close()
        self.handle = open(self.path, "wb")  # noqa: SIM115  closed by finish() or discard()
        self.sha256 = hashlib.sha256()
        self.other = hashlib.md5() if self.algorithm == "md5" else None
        self.length = 0

    def write(self, data):
        self.sha256.update(data)
        if self.other:
            self.other.update(data)
        self.handle.write(data)
        self.length += len(data)

    def finish(self):
        self.handle.close()
        return self.sha256.hexdigest(), self.other.hexdigest() if self.other else None

    def discard(self):
        self.handle.close()
        _unlink_quietly(self.path)


def _draw_progress(done, size):
    if size:
        sys.stderr.write(f"\r  {done / 1e6:7.1f} / {size / 1e6:.1f} MB  {done * 100 // size:3d}%")
    else:
        sys.stderr.write(f"\r  {done / 1e6:7.1f} MB")
    sys.stderr.flush()


def copy_and_hash(source, destination, algorithm):
    """Copy a file while hashing it, in one pass: (sha256, digest of algorithm)
    of what was written."""
    sha256 = hashlib.sha256()
    other = hashlib.new(algorithm) if algorithm != "sha256" else sha256
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    if not os.path.isfile(source) or not os.access(source, os.R_OK):
        raise Rejected(f"cannot read the archive {source}: not a readable file")
    with open(source, "rb") as src, open(destination, "wb") as dst:
        os.fchmod(dst.fileno(), 0o600)
        while True:
            count = src.readinto(buffer)
            if not count:
                break
            sha256.update(view[:count])
            if other is not sha256:
                other.update(view[:count])
            dst.write(view[:count])
    return sha256.hexdigest(), other.hexdigest()


# -------------------------------------------------------------------- archive

class GzipReader:
    """The decompressed bytes of a .tar.gz, inflated by a second thread.

    zlib releases the GIL, so inflating overlaps with tarfile parsing and our
    writes (GNU tar gets the same from its gzip child).  The total output is
    capped, which stops a decompression bomb, and a corrupt or truncated
    stream raises Rejected from read().
    """

    def __init__(self, path, limit):
        import queue
        import zlib

        self._zlib = zlib
        self._queue = queue.Queue(maxsize=8)
        self._pending = b""
        self._offset = 0
        self._position = 0      # bytes handed out: tell(), and seek() forward only
        self._done = False
        self._stop = False
        self._limit = limit
        self._source = open(path, "rb")  # noqa: SIM115  closed by close()
        self._thread = threading.Thread(target=self._inflate, name="gunzip", daemon=True)
        self._thread.start()

    def _inflate(self):
        try:
            total = 0
            inflater = self._zlib.decompressobj(wbits=31)
            started = False
            while not self._stop:
                data = self._source.read(CHUNK)
                if not data:
                    break
                started = True
                while data and not self._stop:
                    out = inflater.decompress(data, CHUNK)
                    data = inflater.unconsumed_tail
                    if inflater.eof:
                        rest = inflater.unused_data + data
                        inflater = self._zlib.decompressobj(wbits=31)
                        data = rest
                        started = bool(rest)
                    if out:
                        total += len(out)
                        if total > self._limit:
                            raise Rejected(f"archive inflates to more than {self._limit >> 20} MB: refused as a decompression bomb")
                        self._queue.put(out)
            if started and not inflater.eof:
                raise Rejected("the archive's gzip stream is truncated")
            self._queue.put(None)
        except self._zlib.error as error:
            self._queue.put(Rejected(f"the archive is not a valid gzip stream ({error})"))
        except BaseException as error:  # noqa: BLE001  any failure reaches the reading thread
            self._queue.put(error)

    def read(self, size=-1):
        parts = []
        wanted = size if size >= 0 else float("inf")
        have = len(self._pending) - self._offset
        while have < wanted and not self._done:
            chunk = self._queue.get()
            if chunk is None:
                self._done = True
                break
            if isinstance(chunk, BaseException):
                self._done = True
                raise chunk
            if self._offset:
                self._pending = self._pending[self._offset:]
                self._offset = 0
            parts.append(chunk)
            have += len(chunk)
        if parts:
            self._pending = b"".join([self._pending[self._offset:]] + parts)
            self._offset = 0
        if size < 0 or size >= len(self._pending) - self._offset:
            data = self._pending[self._offset:]
            self._pending, self._offset = b"", 0
        else:
            data = self._pending[self._offset:self._offset + size]
            self._offset += size
        self._position += len(data)
        return data

    def tell(self):
        return self._position

    def seek(self, position, whence=0):
        """tarfile skips forward over what it does not read; never back."""
        if whence != 0 or position < self._position:
            raise Rejected("the archive's tar stream asked to go backwards: refused")
        while self._position < position:
            if not self.read(min(position - self._position, CHUNK)):
                break
        return self._position

    def drain(self, limit):
        """Read to the end, so the gzip CRC and length are checked; more than
        limit bytes after the tar's end is junk (or a bomb): rejected."""
        trailing = 0
        while True:
            data = self.read(CHUNK)
            if not data:
                return
            trailing += len(data)
            if trailing > limit:
                raise Rejected(f"the archive has more than {limit} bytes of data after the end of the tar")

    def close(self):
        self._stop = True
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except Exception:  # noqa: BLE001, S110  queue.Empty: keep draining until the thread ends
                pass
        self._source.close()


class StagedTree:
    """What stage_archive wrote: entries (rel, kind, mode) in parent-first order."""

    def __init__(self, staging, entries, version):
        self.staging = staging
        self.entries = entries
        self.version = version

    def manifest(self):
        return sorted(rel for rel, kind, _ in self.entries if kind != "dir")


def is_preserved(rel, preserved):
    """rel equals a preserved path or lies under one."""
    parts = rel.split("/")
    return any("/".join(parts[:i]) in preserved for i in range(1, len(parts) + 1))


def _clean_member_name(name):
    """The member's path relative to ROOT, or raise Rejected on any escape."""
    if "\x00" in name:
        raise Rejected(f"archive member {name!r}: NUL byte in the name")
    if name.startswith("/"):
        raise Rejected(f"archive member {name!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Rejected(f"archive member {name!r}: '..' in the path")
    return "/".join(parts)


def _resolve_link(rel, target, symlinks):
    """Where a relative symlink points, inside the tree; raise Rejected if not."""
    if not target or target.startswith("/"):
        raise Rejected(f"archive member {rel!r}: symlink to an absolute path {target!r}")
    parts = rel.split("/")[:-1]
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise Rejected(f"archive member {rel!r}: symlink {target!r} points outside the tree")
            parts.pop()
            continue
        parts.append(part)
        if "/".join(parts) in symlinks:
            raise Rejected("archive member {!r}: symlink {!r} goes through another symlink {!r}".format(rel, target, "/".join(parts)))
    return "/".join(parts)


def stage_archive(archive, staging, settings, uid=-1, gid=-1):
    """Validate every member of a .tar.gz and extract it into staging.

    One pass, our own rules (SPEC 7), before anything reaches the live tree:
    absolute paths, '..', symlinks out or through symlinks, hardlinks, devices,
    FIFOs, duplicates, file/dir conflicts, member and size limits, corrupt
    streams.  Preserved paths are validated but not extracted.  Files are
    created O_EXCL|O_NOFOLLOW under directories we created, owned uid:gid,
    with setuid/setgid/sticky and group/other write dropped.
    """
    import tarfile

    os.mkdir(staging, 0o700)
    reader = GzipReader(archive, limit=settings.max_unpacked + settings.max_members * 1536 + CHUNK)
    writers = FileWriters()
    kinds = {}          # rel -> "file" | "dir" | "link" | "implicit"
    modes = {}
    symlinks = {}       # rel -> target
    made = set()        # directories created in staging
    total = 0
    count = 0
    try:
        try:
            # "r:" reads our stream directly (its "r|" mode re-slices a buffer
            # on every small read); GzipReader.seek() only ever goes forward.
            tar = tarfile.open(fileobj=reader, mode="r:")  # noqa: SIM115  reader owns the file
        except tarfile.ReadError as error:
            raise Rejected(f"the archive is not a tar stream ({error})")
        while True:
            try:
                member = tar.next()
            except tarfile.TarError as error:
                raise Rejected(f"the archive is corrupt after {count} members ({error})")
            if member is None:
                break
            count += 1
            if count > settings.max_members:
                raise Rejected(f"the archive holds more than {settings.max_members} members: refused")
            rel = _clean_member_name(member.name)
            kind = _member_kind(member, rel)
            if not rel:
                if kind != "dir":
                    raise Rejected(f"archive member {member.name!r} is not a directory but names the tree's root")
                continue
            _check_parents(rel, kinds, symlinks)
            previous = kinds.get(rel)
            if previous == "implicit" and kind == "dir":
                pass
            elif previous is not None:
                raise Rejected("archive member {!r}: {}".format(
                    member.name, "duplicate member" if previous == kind else f"a {kind} where the archive has a directory"))
            if kind == "file":
                total += member.size
                if total > settings.max_unpacked:
                    raise Rejected(f"the archive unpacks to more than {settings.max_unpacked >> 20} MB: refused")
            elif kind == "link":
                symlinks[rel] = member.linkname
                _resolve_link(rel, member.linkname, symlinks)
            kinds[rel] = kind
            mode = member.mode & 0o755
            modes[rel] = mode
            _add_implicit_parents(rel, kinds, modes)
            if is_preserved(rel, settings.preserved):
                continue
            _make_parents(staging, rel, made)
            target = os.path.join(staging, rel)
            if kind == "dir":
                if rel not in made:
                    os.mkdir(target, 0o700)
                    made.add(rel)
            elif kind == "link":
                os.symlink(member.linkname, target)
                if uid >= 0:
                    os.lchown(target, uid, gid)
            else:
                _write_member(tar, member, target, mode, uid, gid, writers)
        reader.drain(limit=CHUNK)
        writers.finish()
        for rel, target in symlinks.items():   # order-independent: links made later
            _resolve_link(rel, target, symlinks)
    finally:
        writers.close()
        reader.close()
    entries = []
    for rel in sorted(kinds, key=lambda r: r.split("/")):
        if is_preserved(rel, settings.preserved):
            continue
        kind = "dir" if kinds[rel] == "implicit" else kinds[rel]
        entries.append((rel, kind, modes[rel]))
    for rel, kind, mode in reversed(entries):     # after the files: like tar
        if kind == "dir":
            path = os.path.join(staging, rel)
            os.chmod(path, mode | 0o700 if os.geteuid() else mode)
            if uid >= 0:
                os.lchown(path, uid, gid)
    return StagedTree(staging, entries, tree_version(staging))


def _member_kind(member, rel):
    if member.isreg():
        if member.sparse is not None or member.type == b"S":
            raise Rejected(f"archive member {rel!r}: sparse files are not allowed")
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "link"
    what = ("a hardlink" if member.islnk() else "a device file" if member.isdev() and not member.isfifo()
            else "a FIFO" if member.isfifo() else f"an unsupported type {member.type!r}")
    raise Rejected(f"archive member {rel!r} is {what}: only files, directories and relative symlinks are allowed")


def _check_parents(rel, kinds, symlinks):
    parts = rel.split("/")
    for i in range(1, len(parts)):
        parent = "/".join(parts[:i])
        kind = kinds.get(parent)
        if kind == "link":
            raise Rejected(f"archive member {rel!r} goes through the symlink {parent!r}")
        if kind == "file":
            raise Rejected(f"archive member {rel!r}: its parent {parent!r} is a file in the archive")


def _add_implicit_parents(rel, kinds, modes):
    parts = rel.split("/")
    for i in range(1, len(parts)):
        parent = "/".join(parts[:i])
        if parent not in kinds:
            kinds[parent] = "implicit"
            modes[parent] = 0o755


def _make_parents(staging, rel, made):
    parent = rel.rpartition("/")[0]
    if parent and parent not in made:
        os.makedirs(os.path.join(staging, parent), 0o700, exist_ok=True)
        parts = parent.split("/")
        made.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))


def _write_member(tar, member, target, mode, uid, gid, writers):
    """Small files go to the writer threads with their bytes; big ones stream here."""
    source = tar.extractfile(member)
    if member.size <= FileWriters.SMALL:
        data = source.read(member.size)
        if len(data) != member.size:
            raise Rejected(f"archive member {member.name!r} is truncated")
        writers.submit(target, data, mode, uid, gid, member.mtime)
        return
    fd = _create(target)
    try:
        remaining = member.size
        while remaining:
            data = source.read(min(remaining, CHUNK))
            if not data:
                raise Rejected(f"archive member {member.name!r} is truncated")
            _write_all(fd, data)
            remaining -= len(data)
        _finish_file(fd, mode, uid, gid, member.mtime)
    finally:
        os.close(fd)


def _create(target):
    return os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _finish_file(fd, mode, uid, gid, mtime):
    if uid >= 0:
        os.fchown(fd, uid, gid)
    os.fchmod(fd, mode)
    os.utime(fd, (mtime, mtime))


class FileWriters:
    """A few threads that create and fill the small staged files.

    open(2) is the slow part of unpacking many files on some filesystems (about
    1 ms here, for GNU tar as for us) and it releases the GIL, so creating
    files from several threads overlaps that wait; tar does one at a time.
    Each directory's files go to one thread: creates in one directory contend
    for its lock, and the kernel spins on that.  At most BUDGET bytes wait in
    the queues, whatever the archive holds.
    """

    SMALL = 2 << 20
    BUDGET = 8 << 20
    THREADS = 4

    def __init__(self):
        import queue

        self.queues = [queue.Queue(maxsize=32) for _ in range(self.THREADS)]
        self.room = threading.Condition()
        self.in_flight = 0
        self.error = None
        self.threads = [threading.Thread(target=self._work, args=(jobs,), name="writer", daemon=True)
                        for jobs in self.queues]
        for thread in self.threads:
            thread.start()

    def submit(self, target, data, mode, uid, gid, mtime):
        if self.error:
            raise self.error
        with self.room:
            while self.in_flight and self.in_flight + len(data) > self.BUDGET:
                self.room.wait()
            self.in_flight += len(data)
        jobs = self.queues[hash(os.path.dirname(target)) % len(self.queues)]
        jobs.put((target, data, mode, uid, gid, mtime))

    def _work(self, jobs):
        while True:
            job = jobs.get()
            if job is None:
                return
            if self.error:
                continue
            target, data, mode, uid, gid, mtime = job
            try:
                fd = _create(target)
                try:
                    _write_all(fd, data)
                    _finish_file(fd, mode, uid, gid, mtime)
                finally:
                    os.close(fd)
            except BaseException as error:  # noqa: BLE001  the first failure is raised by finish()
                self.error = self.error or error
            with self.room:
                self.in_flight -= len(data)
                self.room.notify()

    def close(self):
        """Stop the threads (after the queued files are written)."""
        for jobs in self.queues:
            jobs.put(None)
        for thread in self.threads:
            thread.join()
        self.threads = []

    def finish(self):
        self.close()
        if self.error:
            raise self.error


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ---------------------------------------------------------------- transaction

# The journal's steps: verifying -> staged -> stopped -> swapping -> swapped ->
# starting -> started -> committed -> finalized, or rolling_back -> rolled_back
# (or rollback_failed).  A run that dies in one of these is rolled back by the
# next one; one that dies at "started" or later is completed.
UNDO_STEPS = ("stopped", "swapping", "swapped", "starting", "rolling_back")


def crash_point(name):
    """Fault injection for the test suite's crash matrix: SIGKILL ourselves
    when XCVM_UPDATE_CRASH_AT names this point (a journal step, or swap:N
    after N rows of the swap)."""
    if os.environ.get("XCVM_UPDATE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def write_json_atomic(path, data):
    """Temp file, fsync, rename, fsync of the directory: all or nothing."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(temporary, path)
    directory = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _write_json_quietly(path, data):
    try:
        write_json_atomic(path, data)
    except OSError:
        pass


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


class Lock:
    """flock(2) on STATE/lock: one updater per node; a second one gets Busy."""

    def __init__(self, path):
        self.path = path
        self.fd = None

    def acquire(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Busy("busy: another xcvm-update (pid {}) holds {}; try again when it ends".format(holder or "?", self.path))
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Service:
    """The panel's systemd unit, through --systemctl (a stand-in in tests)."""

    def __init__(self, settings, log):
        self.settings = settings
        self.log = log

    def _run(self, *args):
        import subprocess

        command = self.settings.systemctl + list(args)
        try:
            done = subprocess.run(command, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            return 127, _error_text(error)
        return done.returncode, done.stdout.decode("utf-8", "replace").strip()

    def call(self, *args):
        code, output = self._run(*args)
        if code:
            last = output.splitlines()[-1] if output else "no output"
            command = " ".join(args)
            raise UpdateError(f"'systemctl {command}' failed (exit {code}: {last})")

    def stop(self):
        self.call("stop", self.settings.service)

    def start(self):
        self.call("start", self.settings.service)

    def daemon_reload(self):
        self.call("daemon-reload")

    def wait_active(self, deadline):
        while True:
            code, output = self._run("is-active", self.settings.service)
            if code == 0:
                return
            if time.monotonic() >= deadline:
                raise UpdateError("service {} is not active ({})".format(self.settings.service, output or f"exit {code}"))
            time.sleep(0.5)


def health_gate(settings, service, log):
    """The new version must run: is-active, health_url 2xx, the panel's status."""
    deadline = time.monotonic() + settings.health_timeout
    service.wait_active(deadline)
    if settings.health_url:
        http = HttpClient(timeout=min(10, settings.http_timeout))
        while True:
            try:
                connection, response = http.open(settings.health_url)
                connection.close()
                if 200 <= response.status < 300:
                    break
                problem = f"HTTP {response.status}"
            except UpdateError as error:
                problem = str(error)
            if time.monotonic() >= deadline:
                raise UpdateError(f"health check {_redact_url(settings.health_url)} failed: {problem}")
            time.sleep(1)
    status_command = os.path.join(settings.root, "status")
    if os.access(status_command, os.X_OK):
        _run_checked([status_command], "the panel's status command", max(5, deadline - time.monotonic()))
    log.info("health gate passed")


def _run_checked(command, what, timeout):
    import subprocess

    try:
        done = subprocess.run(command, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UpdateError(f"{what} did not finish within {timeout:.0f} s")
    except OSError as error:
        raise UpdateError(f"{what} could not run: {_error_text(error)}")
    if done.returncode:
        lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
        last = lines[-1] if lines else "no output"
        raise UpdateError(f"{what} failed (exit {done.returncode}: {last})")


def check_nginx(settings):
    """nginx -t with the panel's own binary, when the node has one."""
    nginx = os.path.join(settings.root, "bin", "nginx", "sbin", "nginx")
    if os.access(nginx, os.X_OK):
        _run_checked([nginx, "-t", "-p", os.path.join(settings.root, "bin", "nginx") + "/"], "nginx -t", 60)


def resolve_owner(spec):
    """'user:group' (names or numbers) as (uid, gid); raise before any change."""
    import grp
    import pwd

    user, _, group = spec.partition(":")
    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        if not group:
            gid = pwd.getpwuid(uid).pw_gid
        else:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise UpdateError(f"owner {spec!r} does not exist on this system: fix --owner or the settings file")
    return uid, gid


def _describe(path):
    """[kind, mode, uid, gid] of what is at path now, or None."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):   # absent, or under what is a file today
        return None
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "file"
    return [kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]


class Plan:
    """The swap, as a list of [op, rel, kind, before] rows saved before it runs.

    "put" moves staging/rel to ROOT/rel (the live one, if any, to backup/rel
    first); "remove" moves ROOT/rel to backup/rel.  apply() and revert() are
    both idempotent and judge each row by what exists where, because rename(2)
    is atomic: after a crash at any instant either direction can be finished.
    """

    def __init__(self, root, txn_dir, rows):
        self.root = root
        self.staging = os.path.join(txn_dir, "staging")
        self.backup = os.path.join(txn_dir, "backup")
        self.rows = rows
        self._backup_dirs = set()

    @classmethod
    def build(cls, root, txn_dir, entries, removals):
        rows = [["put", rel, kind, _describe(os.path.join(root, rel))] for rel, kind, _ in entries]
        for rel in removals:
            before = _describe(os.path.join(root, rel))
            if before:
                rows.append(["remove", rel, before[0], before])
        return cls(root, txn_dir, rows)

    @classmethod
    def load(cls, root, txn_dir):
        rows = _read_json(os.path.join(txn_dir, "plan.json"))
        return cls(root, txn_dir, rows or [])

    def save(self, txn_dir):
        write_json_atomic(os.path.join(txn_dir, "plan.json"), self.rows)

    def _paths(self, rel):
        return os.path.join(self.root, rel), os.path.join(self.staging, rel), os.path.join(self.backup, rel)

    def _save(self, live, saved):
        parent = os.path.dirname(saved)
        if parent not in self._backup_dirs:
            os.makedirs(parent, exist_ok=True)
            self._backup_dirs.add(parent)
        os.rename(live, saved)

    def apply(self):
        lexists = os.path.lexists
        for index, (op, rel, kind, before) in enumerate(self.rows):
            crash_point(f"swap:{index}")
            live, staged, saved = self._paths(rel)
            if op == "remove":
                if lexists(live) and not lexists(saved):
                    self._save(live, saved)
            elif kind == "dir":
                st = os.lstat(staged)
                if not (before and before[0] == "dir"):
                    if before and not lexists(saved):
                        self._save(live, saved)
                    if not os.path.isdir(live):
                        os.mkdir(live, 0o700)
                os.chmod(live, stat.S_IMODE(st.st_mode))
                os.lchown(live, st.st_uid, st.st_gid)
            elif lexists(staged):
                if before and not lexists(saved):
                    self._save(live, saved)
                os.rename(staged, live)

    def revert(self):
        lexists = os.path.lexists
        for op, rel, kind, before in reversed(self.rows):
            live, staged, saved = self._paths(rel)
            if op == "remove":
                if lexists(saved) and not lexists(live):
                    os.rename(saved, live)
            elif kind == "dir":
                if before and before[0] == "dir":
                    os.chmod(live, before[1])
                    os.lchown(live, before[2], before[3])
                    continue
                if os.path.isdir(live) and not os.path.islink(live):
                    os.rmdir(live)
                if lexists(saved):
                    os.rename(saved, live)
            else:
                if not lexists(staged) and lexists(live):
                    os.rename(live, staged)
                if lexists(saved):
                    os.rename(saved, live)

    def counts(self):
        put = [row for row in self.rows if row[0] == "put" and row[2] != "dir"]
        return {"added": sum(1 for row in put if not row[3]),
                "replaced": sum(1 for row in put if row[3]),
                "removed": sum(1 for row in self.rows if row[0] == "remove")}


class Journal:
    """STATE/journal.json: the one unfinished transaction, rewritten atomically."""

    def __init__(self, settings):
        self.path = settings.state("journal.json")
        self.result_path = settings.state("last_result.json")
        self.data = _read_json(self.path)

    def begin(self, kind, txn_dir, from_version, to_version, archive_sha256=None):
        now = int(time.time())
        self.data = {"id": os.path.basename(txn_dir), "kind": kind, "txn_dir": txn_dir,
                     "from_version": from_version, "to_version": to_version,
                     "archive_sha256": archive_sha256, "step": "verifying",
                     "started_at": now, "updated_at": now, "error": None}
        write_json_atomic(self.path, self.data)
        crash_point("verifying")

    def step(self, step, **fields):
        self.data.update(fields, step=step, updated_at=int(time.time()))
        write_json_atomic(self.path, self.data)
        crash_point(step)

    def finish(self, outcome, error=None):
        """Record the end state in last_result.json and close the journal."""
        self.data.update(step=outcome, error=error, updated_at=int(time.time()))
        write_json_atomic(self.result_path, self.data)
        if outcome == "rollback_failed":
            write_json_atomic(self.path, self.data)   # stays: blocks new updates
        else:
            _unlink_quietly(self.path)
        result, self.data = self.data, None
        return result


def new_txn_dir(settings):
    now = time.time()   # ids sort in time order: backups are pruned oldest first
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}"
    folder = work_dir(settings)
    for private in (folder, os.path.join(folder, "txn")):
        os.makedirs(private, 0o700, exist_ok=True)
    path = os.path.join(folder, "txn", f"{stamp}-{os.urandom(3).hex()}")
    os.mkdir(path, 0o700)
    return path


class Installer:
    """The privileged transaction (SPEC 6) and its recovery.

    A transaction has a direction: an install applies its plan, a rollback of
    a committed install reverts that install's plan.  Whatever fails after the
    stop undoes the direction taken, and so does recovery after a crash.
    """

    def __init__(self, ctx):
        self.ctx = ctx
        self.settings = ctx.settings
        self.log = ctx.log
        self.service = Service(ctx.settings, ctx.log)
        self.journal = Journal(ctx.settings)

    # -- the forward path
    def install(self, archive, expected, version):
        settings = self.settings
        uid, gid = resolve_owner(settings.owner)
        from_version = self.ctx.installed_version()
        txn_dir = new_txn_dir(settings)
        algorithm, want = expected.split(":", 1)
        self.journal.begin("install", txn_dir, from_version, version)
        try:
            private = os.path.join(txn_dir, "archive.tar.gz")
            sha256, got = copy_and_hash(archive, private, algorithm)
            if got != want:
                raise Rejected(f"{algorithm} of {archive} is {got}, expected {want}: not installed")
            self.log.info("verified {} ({})".format(archive, expected if algorithm == "sha256" else "md5, weak"))
            started = time.monotonic()
            staged = stage_archive(private, os.path.join(txn_dir, "staging"), settings, uid, gid)
            to_version = version or staged.version
            if not to_version:
                raise Rejected("cannot tell the archive's version (no XC_VM_VERSION define): pass --version TAG")
            self.log.info(f"staged {len(staged.entries)} entries of {to_version} in {time.monotonic() - started:.1f} s")
            removals = obsolete_files(settings, staged)
            write_json_atomic(os.path.join(txn_dir, "manifest.json"), staged.manifest())
            write_json_atomic(os.path.join(txn_dir, "manifest.before.json"),
                              _read_json(settings.state("manifest.json")) or [])
            os.sync()   # staged bytes on disk before the live tree depends on them
            self.journal.step("staged", to_version=to_version, archive_sha256=sha256)
        except BaseException as error:   # whatever stops us, nothing may stay half-staged
            _remove_tree(txn_dir)
            if isinstance(error, OSError):
                error = UpdateError(describe_os_error(error, "staging the update"))
            outcome = "rejected" if isinstance(error, Rejected) else "failed"
            self.journal.finish(outcome, str(error) or type(error).__name__)
            self.ctx.record("update {} -> {} {} before any change: {}".format(
                from_version, version or "?", outcome, error), status=1)
            raise
        self._swap_and_gate(lambda: Plan.build(settings.root, txn_dir, staged.entries, removals))
        return self.journal.data

    def _swap_and_gate(self, make_plan):
        """Stop, swap, start, gate, commit; on failure undo and raise RolledBack."""
        data = self.journal.data
        txn_dir = data["txn_dir"]
        stopped_at = time.monotonic()
        try:
            self.service.stop()
            self.journal.step("stopped")
            plan = make_plan()
            plan.save(txn_dir)
            self.journal.step("swapping")
            plan.apply() if data["kind"] == "install" else plan.revert()
            self.journal.step("swapped", **plan.counts())
            self.service.daemon_reload()
            check_nginx(self.settings)
            self.journal.step("starting")
            self.service.start()
            downtime = time.monotonic() - stopped_at
            health_gate(self.settings, self.service, self.log)
            self.journal.step("started", downtime_seconds=round(downtime, 3))
        except BaseException as error:  # noqa: BLE001  whatever fails after the stop, the old tree comes back
            reason = str(error) or type(error).__name__
            self.log.error("{} {} -> {} failed after the stop: {}".format(
                data["kind"], data["from_version"], data["to_version"], reason))
            result = self.undo(reason)
            raise RolledBack("{} to {} failed ({}); rolled back, {} runs".format(
                data["kind"], data["to_version"], reason, result["from_version"]))
        self.commit()

    def commit(self):
        """The new tree passed its gate: make it the installed release."""
        data = self.journal.data
        txn_dir = data["txn_dir"]
        if data["kind"] == "install":
            manifest = _read_json(os.path.join(txn_dir, "manifest.json"))
            if manifest is not None:
                write_json_atomic(self.settings.state("manifest.json"), manifest)
            self.journal.step("committed")
            _unlink_quietly(os.path.join(txn_dir, "archive.tar.gz"))
            backups = os.path.join(work_dir(self.settings), "backups")
            keep = os.path.join(backups, data["id"])
            if os.path.isdir(txn_dir):
                os.makedirs(backups, 0o700, exist_ok=True)
                _write_json_quietly(os.path.join(txn_dir, "txn.json"), data)
                os.rename(txn_dir, keep)
            self.journal.step("committed", txn_dir=keep)
        else:
            previous = _read_json(os.path.join(txn_dir, "manifest.before.json"))
            if previous is not None:
                write_json_atomic(self.settings.state("manifest.json"), previous)
            self.journal.step("committed")
            _remove_tree(txn_dir)
        write_json_atomic(self.journal.result_path, self.journal.data)
        prune_backups(self.settings)
        self.ctx.record("{} {} -> {} committed (downtime {:.2f} s)".format(
            data["kind"], data["from_version"], data["to_version"], data.get("downtime_seconds") or 0))

    # -- the way back
    def undo(self, reason):
        """Put the old tree back exactly and start it; RollbackFailed if not."""
        data = self.journal.data
        txn_dir = data["txn_dir"]
        self.journal.step("rolling_back", error=reason)
        try:
            try:
                self.service.stop()
            except UpdateError as error:
                self.log.warning(f"{error}; restoring anyway")
            plan = Plan.load(self.settings.root, txn_dir)
            plan.revert() if data["kind"] == "install" else plan.apply()
            self.service.daemon_reload()
            self.service.start()
            self.service.wait_active(time.monotonic() + self.settings.health_timeout)
        except BaseException as error:  # noqa: BLE001  the operator must hear of any failure here
            problem = str(error) or type(error).__name__
            self.journal.finish("rollback_failed", f"{reason}; then the rollback failed: {problem}")
            self.ctx.record("ROLLBACK FAILED for {} -> {}: {}".format(data["from_version"], data["to_version"], problem), status=4)
            raise RollbackFailed(
                "rollback to {} failed: {}. The saved files are in {}; fix the cause, then run "
                "'xcvm_update rollback' to retry".format(data["from_version"], problem, txn_dir))
        if data["kind"] == "install":
            _remove_tree(txn_dir)
        result = self.journal.finish("rolled_back", reason)
        self.ctx.record("update {} -> {} rolled back, {} runs again: {}".format(
            data["from_version"], data["to_version"], data["from_version"], reason), status=1)
        return result

    def recover(self, retry_failed_rollback=False):
        """Finish whatever a dead run left in the journal; True if it acted.

        A committed journal is a pending finalize, not an unfinished install:
        post-update deals with it.  A failed rollback is retried only when the
        operator asks (rollback), never by cron.
        """
        data = self.journal.data
        if not data or data.get("step") in ("committed", "finalized"):
            return False
        step = data.get("step")
        if step == "rollback_failed" and not retry_failed_rollback:
            raise RollbackFailed("an earlier rollback failed and needs an operator: {}".format(data.get("error")))
        self.log.warning("found an unfinished {} {} -> {} at step {}: recovering".format(
            data.get("kind"), data.get("from_version"), data.get("to_version"), step))
        if step in ("verifying", "staged"):
            if data.get("kind") == "install":
                _remove_tree(data["txn_dir"])
            self._ensure_running()
            self.journal.finish("interrupted", f"interrupted at step {step} before the stop; the old tree was never touched")
            self.ctx.record("update {} -> {} was interrupted before any change; {} runs".format(
                data["from_version"], data["to_version"], data["from_version"]), status=1)
        elif step in UNDO_STEPS or step == "rollback_failed":
            self.undo(data.get("error") or f"the updater died at step {step}")
        elif step == "started":
            self.commit()
        return True

    def _ensure_running(self):
        code, _ = self.service._run("is-active", self.settings.service)
        if code:
            self.service.start()

    # -- the operator's rollback
    def rollback(self):
        backups = list_backups(self.settings)
        if not backups:
            raise UpdateError(f"no backup is kept (keep_backups = {self.settings.keep_backups}): nothing to roll back to")
        meta = backups[0]
        installed = self.ctx.installed_version()
        if meta.get("to_version") and installed and installed != meta["to_version"]:
            raise UpdateError("the newest backup undoes {} -> {} but {} is installed: restore by hand".format(
                meta["from_version"], meta["to_version"], installed))
        self.journal.begin("rollback", meta["txn_dir"], meta["to_version"], meta["from_version"])
        self.journal.step("staged")
        self._swap_and_gate(lambda: Plan.load(self.settings.root, meta["txn_dir"]))
        return self.journal.data


def obsolete_files(settings, staged):
    """Files of the previous release absent from this one, plus the release's
    migrations/deleted_files.txt; never preserved, never outside ROOT."""
    previous = _read_json(settings.state("manifest.json")) or []
    shipped = set(staged.manifest())
    listed = []
    deleted_list = os.path.join(staged.staging, "migrations", "deleted_files.txt")
    if os.path.isfile(deleted_list):
        with open(deleted_list, encoding="utf-8", errors="replace") as handle:
            listed = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    removals = []
    for name in sorted(set(previous) - shipped) + listed:
        try:
            rel = _clean_member_name(name)
        except Rejected:
            continue
        if not rel or rel in shipped or is_preserved(rel, settings.preserved) or rel in removals:
            continue
        if any(p == rel or p.startswith(rel + "/") for p in settings.preserved):
            continue
        real_parent = os.path.realpath(os.path.dirname(os.path.join(settings.root, rel)))
        if real_parent != os.path.realpath(settings.root) and not real_parent.startswith(os.path.realpath(settings.root) + "/"):
            continue
        removals.append(rel)
    return removals


def list_backups(settings):
    """Kept backups, newest first, as their txn.json records."""
    folder = os.path.join(work_dir(settings), "backups")
    try:
        names = sorted(os.listdir(folder), reverse=True)
    except FileNotFoundError:
        return []
    kept = []
    for name in names:
        meta = _read_json(os.path.join(folder, name, "txn.json"))
        if meta:
            meta["txn_dir"] = os.path.join(folder, name)
            kept.append(meta)
    return kept


def prune_backups(settings):
    for meta in list_backups(settings)[settings.keep_backups:]:
        _remove_tree(meta["txn_dir"])


def work_dir(settings):
    """Where transactions stage, back up and keep backups: the state dir, or,
    when that is on another filesystem than ROOT, ROOT/.xcvm-update-work, so
    that every move of the swap is a rename(2) on one filesystem."""
    try:
        same = os.stat(settings.state_dir).st_dev == os.stat(settings.root).st_dev
    except FileNotFoundError:
        same = True
    return settings.state_dir if same else os.path.join(settings.root, WORK_DIR_NAME)


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_tree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------- commands

class Context:
    """Settings, log and the lazily opened database of one run."""

    def __init__(self, settings, log):
        self.settings = settings
        self.log = log
        self._panel = None
        self._db = None
        self._db_problem = None

    def panel(self):
        if self._panel is None:
            self._panel = PanelConfig(self.settings.config)
        return self._panel

    def db(self):
        if self._db_problem:
            raise DatabaseUnavailable(self._db_problem)
        if self._db is None:
            panel = self.panel()    # a broken config.ini is the operator's to fix: not quiet
            try:
                self._db = Database(panel)
            except DatabaseUnavailable as error:
                self._db_problem = str(error)
                raise DatabaseUnavailable(self._db_problem)
        return self._db

    def try_db(self, action):
        """action(db), or None with a warning when the database fails."""
        try:
            return action(self.db())
        except Exception as error:  # noqa: BLE001  DatabaseUnavailable or any PyMySQL error
            if not isinstance(error, UpdateError):
                self._db_problem = f"database error: {_db_error_text(error)}"
                self.close()
            self.log.warning(f"{self._db_problem or error} (the step goes on without it)")
            return None

    def record(self, message, status=None):
        """An admin-visible step: the log, mysql_syslog and servers.status."""
        self.log.info(message)

        def write(db):
            if status is not None:
                db.set_status(status)
            db.syslog(message)
        self.try_db(write)

    def installed_version(self):
        return (tree_version(self.settings.root)
                or self.try_db(lambda db: db.recorded_version()) or "unknown")

    def close(self):
        if self._db is not None:
            try:
                self._db.close()
            except Exception:  # noqa: BLE001, S110  closing a broken connection may fail too
                pass
            self._db = None


def _tag_version(tag):
    """'v2.1.2' -> '2.1.2': the form the panel stores and declares."""
    return tag[1:] if tag[:1] in "vV" and version_key(tag) else tag


def finalize(ctx):
    """post-update (SPEC 8): version and status, LB signals, mark complete.

    Raises DatabaseUnavailable with the finalize left pending in the journal.
    """
    journal = Journal(ctx.settings)
    pending = journal.data if journal.data and journal.data.get("step") == "committed" else None
    version = pending["to_version"] if pending else ctx.installed_version()
    try:
        db = ctx.db()
        db.set_installed(version)
        propagate = pending is None or pending.get("kind") == "install"
        signalled = db.propagate_to_lbs() if propagate and db.is_main() else 0
        db.syslog("update to {} complete{}".format(version, f"; {signalled} load balancers signalled" if signalled else ""))
    except Exception as error:  # noqa: BLE001  any PyMySQL error leaves the finalize pending
        problem = str(error) if isinstance(error, UpdateError) else _db_error_text(error)
        if pending:
            journal.step("committed", error="finalize pending: " + problem)
        raise DatabaseUnavailable(f"finalize of {version} is pending ({problem}); the files are installed and every poll retries it")
    if pending:
        journal.data["lb_signals"] = signalled
        journal.finish("finalized")
    ctx.log.info("{} finalized{}".format(version, f"; {signalled} load balancers signalled" if signalled else ""))
    return version, signalled


def _locked(ctx):
    return Lock(ctx.settings.state("lock")).acquire()


def cmd_install(ctx, args):
    expected = parse_hash(args.hash)
    if _escape_service_cgroup(ctx.settings, args):
        return EXIT_OK
    lock = _locked(ctx)
    try:
        return _install_locked(ctx, args.archive, expected, args.version and _tag_version(args.version))
    finally:
        lock.release()


def _install_locked(ctx, archive, expected, version):
    installer = Installer(ctx)
    installer.recover()
    if installer.journal.data:      # a finalize from an earlier install
        _finalize_quietly(ctx)
    data = installer.install(archive, expected, version)
    ctx.log.info("installed {to_version} (was {from_version}): {added} added, {replaced} replaced, "
                 "{removed} removed, downtime {downtime_seconds:.2f} s".format_map(data))
    _finalize_quietly(ctx)
    if os.path.abspath(archive) == ctx.settings.download_path:
        _unlink_quietly(archive)
    return EXIT_OK


def _finalize_quietly(ctx):
    try:
        finalize(ctx)
    except DatabaseUnavailable as error:
        ctx.log.warning(str(error))


def _escape_service_cgroup(settings, args):
    """Re-run install in a transient systemd unit when we live inside the
    panel's own unit: stopping the panel would otherwise kill the install."""
    import shutil
    import subprocess

    try:
        with open("/proc/self/cgroup") as handle:
            inside = f"/{settings.service}.service" in handle.read()
    except OSError:
        return False
    systemd_run = shutil.which("systemd-run")
    if not inside or not systemd_run or os.environ.get("XCVM_UPDATE_DETACHED"):
        return False
    unit = f"xcvm-update-install-{time.time()}"
    subprocess.run([systemd_run, "--quiet", "--collect", "--unit", unit, "--setenv=XCVM_UPDATE_DETACHED=1",
                    sys.executable, _program_path()] + _global_flags(args) +
                   ["install", args.archive, args.hash] + (["--version", args.version] if args.version else []),
                   check=True)
    print(f"install continues in the transient unit {unit} (outside {settings.service}.service); see 'status'")
    return True


def _program_path():
    return os.path.abspath(sys.argv[0]) if sys.argv[0].endswith((".pyz", ".py")) else os.path.abspath(__file__)


def _global_flags(args):
    flags = []
    for option in GLOBAL_OPTIONS:
        value = getattr(args, option[0], None)
        if value is not None:
            flags += ["--" + option[0].replace("_", "-"), value]
    return flags


def cmd_update(ctx, args, force=False, from_poll=False):
    settings, log = ctx.settings, ctx.log
    force = force or getattr(args, "force", False)
    wanted = getattr(args, "version", None)
    url = getattr(args, "url", None)
    # Install here when root, or when the state dir is ours to write (the demo's
    # sandbox): only root creates it on a node, so the panel's user hands over.
    as_root = os.geteuid() == 0 or os.access(settings.state_dir, os.W_OK)
    lock = _locked(ctx) if as_root and not from_poll else None
    try:
        if as_root:
            installer = Installer(ctx)
            installer.recover()
            if installer.journal.data:
                _finalize_quietly(ctx)
        installed = ctx.installed_version()
        if url:
            if not args.sha256:
                raise UpdateError("--url needs --sha256 HEX (the archive's published hash)")
            release = Release(wanted, os.path.basename(url), url, None, parse_hash(args.sha256), weak=False)
        else:
            release = _choose_release(ctx, wanted)
            if release is None:
                return EXIT_OK
            if not (wanted or force) and not is_newer(release.tag, installed):
                log.info(f"up to date: {installed} installed, newest release is {release.tag}")
                return EXIT_OK
            if from_poll and not force and _failed_before(settings, installed, release.tag):
                ctx.record(f"not retrying {installed} -> {_tag_version(release.tag)} by itself: it failed before; send an update with force, "
                           "or wait for a newer release")
                return EXIT_OK
        log.info("downloading {} {} to {}".format(release.asset_name, release.tag or "", settings.download_path))
        downloader = Downloader(HttpClient(settings.github_token, settings.http_timeout), log,
                                settings.download_retries, progress=sys.stderr.isatty() and log.verbosity >= 1)
        sha256 = downloader.fetch(release.url, settings.download_path, release.size, release.hash_spec)
        ctx.record("downloaded and verified {} {} (sha256 {}{})".format(
            release.asset_name, release.tag or "", sha256[:16], ", checked against a weak md5" if release.weak else ""))
        if getattr(args, "download_only", False):
            print(f"{settings.download_path} sha256:{sha256}")
            return EXIT_OK
        version = release.tag and _tag_version(release.tag)
        ctx.try_db(lambda db: db.set_status(5))
        if as_root:
            return _install_locked(ctx, settings.download_path, "sha256:" + sha256, version)
        return _hand_over(ctx, args, "sha256:" + sha256, version)
    finally:
        if lock:
            lock.release()


def _choose_release(ctx, wanted, write_cache=True):
    settings, log = ctx.settings, ctx.log
    try:
        is_main = ctx.db().is_main()
        channel = settings.channel or ctx.db().update_channel()
    except DatabaseUnavailable as error:
        is_main = not ctx.panel().is_lb
        channel = settings.channel or "stable"
        log.warning("{}: node type {} from config.ini (is_lb), channel {}".format(error, "MAIN" if is_main else "LB", channel))
    source = ReleaseSource(settings, log, HttpClient(settings.github_token, settings.http_timeout), write_cache)
    tag, release = source.choose(source.list_releases(), channel, wanted)
    return source.asset(tag, release, settings.main_asset if is_main else settings.lb_asset)


def _failed_before(settings, installed, tag):
    last = _read_json(settings.state("last_result.json")) or {}
    if last.get("step") not in ("rolled_back", "rejected", "rollback_failed", "failed"):
        return False
    same = (version_key(last.get("from_version")) == version_key(installed)
            and version_key(last.get("to_version")) == version_key(tag))
    return same and version_key(tag) is not None


def _hand_over(ctx, args, expected, version):
    """Not root: start `sudo -n install` in its own session, then return.

    No global options go along: through sudo, install takes its settings from
    root's /etc/xcvm-update.ini only (see main), so the sudoers line stays safe.
    """
    import subprocess

    command = (["sudo", "-n", sys.executable, _program_path(), "install", ctx.settings.download_path, expected] +
               (["--version", version] if version else []))
    try:
        subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    except OSError as error:
        raise UpdateError(f"cannot start sudo: {_error_text(error)}; see README, sudoers")
    ctx.log.info("install handed over to sudo; follow it with 'status'")
    return EXIT_OK


def cmd_poll(ctx, args):
    """cron, every minute: recover, finalize, claim, update; quiet when idle."""
    settings, log = ctx.settings, ctx.log
    try:
        lock = _locked(ctx)
    except Busy as error:
        log.quiet_info(str(error))
        return EXIT_BUSY
    try:
        installer = Installer(ctx)
        try:
            installer.recover()
        except RollbackFailed as error:
            log.quiet_info(str(error))
            return EXIT_ROLLBACK_FAILED
        if installer.journal.data:
            try:
                finalize(ctx)
            except DatabaseUnavailable as error:
                log.quiet_info(str(error))
                return EXIT_ERROR
        request_path = settings.state("request.json")
        request = _read_json(request_path)
        try:
            if ctx.db().pending_update_signals():
                ctx.db().claim_update_signals(lambda ids, force: _record_claim(request_path, request, ids, force))
                request = _read_json(request_path)
        except DatabaseUnavailable as error:   # cron mails stderr: a down DB is logged, not mailed
            log.quiet_info(f"poll: {error}")
            return EXIT_ERROR
        except Exception as error:   # PyMySQL's errors, without importing it on this path
            if type(error).__module__.split(".")[0] != "pymysql":
                raise
            log.quiet_info(f"poll: database error: {_db_error_text(error)}")
            return EXIT_ERROR
        if not request or request.get("not_before", 0) > time.time():
            return EXIT_OK
        signals = ",".join(map(str, request["signal_ids"]))
        if request.get("attempts"):
            ctx.record(f"retrying the update of signal {signals} (attempt {request['attempts'] + 1})")
        else:
            ctx.record(f"update signal {signals} claimed")
        try:
            code = cmd_update(ctx, args, force=request.get("force", False), from_poll=True)
        except (TransientError, DatabaseUnavailable, Busy) as error:
            attempts = request.get("attempts", 0) + 1
            retry_at = getattr(error, "retry_at", None) or time.time() + min(3600, 60 * 2 ** attempts)
            request.update(attempts=attempts, not_before=int(retry_at), error=str(error))
            write_json_atomic(request_path, request)
            raise UpdateError("{}; poll retries after {}".format(error, time.strftime("%H:%M UTC", time.gmtime(retry_at))))
        except UpdateError:
            _unlink_quietly(request_path)
            raise
        _unlink_quietly(request_path)
        return code
    finally:
        lock.release()


def _record_claim(path, request, ids, force):
    request = request or {"signal_ids": [], "force": False, "attempts": 0}
    request["signal_ids"] = sorted(set(request["signal_ids"]) | set(ids))
    request.update(force=request["force"] or force, claimed_at=int(time.time()), not_before=0)
    write_json_atomic(path, request)


def cmd_post_update(ctx, args):
    lock = _locked(ctx)
    try:
        finalize(ctx)
    finally:
        lock.release()
    return EXIT_OK


def cmd_rollback(ctx, args):
    lock = _locked(ctx)
    try:
        installer = Installer(ctx)
        if installer.recover(retry_failed_rollback=True):
            ctx.log.info("the unfinished update was recovered; run rollback again to go further back")
            return EXIT_OK
        if installer.journal.data:
            _finalize_quietly(ctx)
        data = installer.rollback()
        ctx.log.info("rolled back to {} (downtime {:.2f} s)".format(data["to_version"], data.get("downtime_seconds") or 0))
        _finalize_quietly(ctx)
    finally:
        lock.release()
    return EXIT_OK


def node_status(ctx):
    """What `status` reports: read-only, from the state dir and the tree."""
    settings = ctx.settings
    journal = _read_json(settings.state("journal.json"))
    try:
        panel = ctx.panel()
        node = "LB" if panel.is_lb else "MAIN"
    except UpdateError:
        node = None
    pending = journal if journal and journal.get("step") not in ("committed", "rollback_failed") else None
    last = _read_json(settings.state("last_result.json"))
    return {
        "installed_version": tree_version(settings.root),
        "step": journal.get("step") if journal else None,
        "last_outcome": last.get("step") if last else None,
        "node_type": node,
        "in_progress": pending,
        "finalize_pending": bool(journal and journal.get("step") == "committed"),
        "operator_action_needed": bool(journal and journal.get("step") == "rollback_failed"),
        "last_result": last,
        "backups": [{"id": os.path.basename(b["txn_dir"]), "from_version": b.get("from_version"),
                     "to_version": b.get("to_version"), "at": b.get("updated_at")} for b in list_backups(settings)],
    }


def cmd_status(ctx, args):
    report = node_status(ctx)
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
        return EXIT_OK
    print("installed version: {} (node {})".format(report["installed_version"] or "unknown", report["node_type"] or "unknown"))
    busy = report["in_progress"]
    if busy:
        print("update in progress or interrupted: {} {} -> {} at step {} since {}".format(
            busy.get("kind"), busy.get("from_version"), busy.get("to_version"), busy.get("step"), _when(busy.get("updated_at"))))
    if report["finalize_pending"]:
        print("finalize pending: the files are installed; poll retries the database steps")
    if report["operator_action_needed"]:
        print("OPERATOR ACTION NEEDED: a rollback failed; fix the cause, then run 'rollback'")
    last = report["last_result"]
    if last:
        print("last outcome: {} {} -> {} at {}{}".format(last.get("step"), last.get("from_version"), last.get("to_version"),
                                                    _when(last.get("updated_at")), " ({})".format(last["error"]) if last.get("error") else ""))
    for backup in report["backups"]:
        print("backup kept: {} (undoes {} -> {})".format(backup["id"], backup["from_version"], backup["to_version"]))
    return EXIT_OK


def _when(stamp):
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp)) if stamp else "?"


def cmd_check(ctx, args):
    installed = tree_version(ctx.settings.root) or "unknown"
    release = _choose_release(ctx, None, write_cache=False)
    node = "MAIN" if release.asset_name == ctx.settings.main_asset else "LB"
    available = is_newer(release.tag, installed)
    if args.json:
        print(json.dumps({"installed_version": installed, "node_type": node, "newest_release": release.tag,
                          "asset": release.asset_name, "update_available": available}, sort_keys=True))
    else:
        print("installed {}, node {}, newest release {}: {}".format(
            installed, node, release.tag, "update available" if available else "up to date"))
    return EXIT_UPDATE_AVAILABLE if available else EXIT_OK


# ----------------------------------------------------------------------- demo

SCHEMA = (
    ("CREATE TABLE signals (signal_id INT AUTO_INCREMENT PRIMARY KEY, pid INT NULL, server_id INT,"
    " rtmp TINYINT DEFAULT 0, time INT, custom_data MEDIUMTEXT, cache TINYINT DEFAULT 0, KEY (server_id))"),
    ("CREATE TABLE servers (id INT AUTO_INCREMENT PRIMARY KEY, server_name VARCHAR(255), is_main INT DEFAULT 0,"
    " server_type INT DEFAULT 0, enabled INT DEFAULT 1, status TINYINT DEFAULT 1, last_check_ago INT DEFAULT 0,"
    " xc_vm_version VARCHAR(50), server_ip VARCHAR(255), http_broadcast_port INT DEFAULT 80)"),
    ("CREATE TABLE settings (id INT PRIMARY KEY DEFAULT 1, auto_update_lbs TINYINT DEFAULT 1,"
    " update_channel VARCHAR(12) DEFAULT 'stable')"),
    ("CREATE TABLE mysql_syslog (id INT AUTO_INCREMENT PRIMARY KEY, type VARCHAR(50), error LONGTEXT,"
    " username VARCHAR(64), ip VARCHAR(64), `database` VARCHAR(64), date INT, server_id INT)"),
)

SYSTEMCTL_STAND_IN = """#!/bin/sh
# systemctl stand-in: records each call, keeps the unit's state in a file
here=$(dirname "$0")
echo "$*" >> "$here/systemctl.calls"
case "$1" in
  stop) rm -f "$here/active" ;;
  start) touch "$here/active" ;;
  is-active) [ -e "$here/active" ] && { echo active; exit 0; }; echo inactive; exit 3 ;;
esac
exit 0
"""


def database_server(workdir):
    """A MariaDB for throwaway databases: (host, port, user, password, process).

    XCVM_TEST_DB (user[:password]@host[:port], default root@127.0.0.1:3306)
    when it answers; else a private mariadbd started in workdir; else None
    (also when PyMySQL is missing: the bare module, not the pyz, was run).
    """
    try:
        import pymysql
    except ImportError:
        return None

    target = os.environ.get("XCVM_TEST_DB", "root@127.0.0.1:3306")
    credentials, _, address = target.rpartition("@")
    user, _, password = (credentials or "root").partition(":")
    host, _, port = address.partition(":")
    port = int(port or 3306)
    try:
        pymysql.connect(host=host, port=port, user=user, password=password, connect_timeout=3).close()
        return host, port, user, password, None
    except pymysql.Error:
        pass
    import shutil
    import subprocess

    mariadbd = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/local/sbin")
    install_db = shutil.which("mariadb-install-db")
    if not mariadbd or not install_db:
        return None
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = os.path.join(workdir, "mariadb")
    as_root = ["--user=root"] if os.geteuid() == 0 else []
    subprocess.run([install_db, "--no-defaults", "--datadir=" + data, "--auth-root-authentication-method=normal",
                    "--skip-test-db"] + as_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    process = subprocess.Popen(
        [mariadbd, "--no-defaults", "--datadir=" + data, "--socket=" + os.path.join(workdir, "mariadb.sock"),
         f"--port={port}", "--bind-address=127.0.0.1", "--pid-file=" + os.path.join(workdir, "mariadb.pid"),
         "--log-error=" + os.path.join(workdir, "mariadb.err")] + as_root,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            pymysql.connect(host="127.0.0.1", port=port, user="root", connect_timeout=2).close()
            return "127.0.0.1", port, "root", "", process
        except pymysql.Error:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                return None
            time.sleep(0.3)


def create_panel_database(server, name):
    """A throwaway panel database with the tables of SPEC 4; returns a connection."""
    import pymysql

    host, port, user, password = server[:4]
    admin = pymysql.connect(host=host, port=port, user=user, password=password, autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        cursor.execute(f"CREATE DATABASE `{name}`")
        cursor.execute(f"USE `{name}`")
        for statement in SCHEMA:
            cursor.execute(statement)
        cursor.execute("INSERT INTO settings (id) VALUES (1)")
    return admin


def write_panel_config(path, server, database, server_id=1, is_lb=False):
    host, port, user, password = server[:4]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        lb_line = "is_lb = 1\n" if is_lb else ""
        handle.write(f'[XC_VM]\nhostname = "{host}"\ndatabase = "{database}"\nport = {port}\nserver_id = {server_id}\n'
                     f'{lb_line}[Encrypted]\nusername = "{user}"\npassword = "{password}"\n')


def build_release(path, version, files):
    """A release .tar.gz: files maps relative paths to bytes; version goes in
    www/constants.php as the panel declares it."""
    import io
    import tarfile

    files = dict(files)
    files["www/constants.php"] = b"<?php\ndefine('XC_VM_VERSION', '" + version.encode() + b"');\n"
    with tarfile.open(path, "w:gz") as tar:
        for directory in sorted({posixpath.dirname(name) for name in files} - {""}):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755 if name == "status" else 0o644, 1700000000
            tar.addfile(info, io.BytesIO(data))


class ReleaseServer:
    """A GitHub look-alike on 127.0.0.1: the releases API (with ETag) on one
    port; browser_download_url answers 302 to a second port, as GitHub's asset
    host does, which serves the files with Range."""

    def __init__(self, repo, folder):
        import http.server

        self.repo = repo
        self.folder = folder
        self.releases = []
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.server.server_port, self.path, dict(self.headers)))
                server.handle(self)

        self.api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.assets = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        for httpd in (self.api, self.assets):
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
        self.api_base = f"http://127.0.0.1:{self.api.server_port}"

    def add_release(self, tag, assets, prerelease=False, digest=True):
        """Publish the named files of folder as a release's assets (copied to
        folder/TAG/, so the next release may reuse the names)."""
        import shutil

        entries = []
        os.makedirs(os.path.join(self.folder, tag), exist_ok=True)
        for name in assets:
            path = os.path.join(self.folder, tag, name)
            shutil.copyfile(os.path.join(self.folder, name), path)
            entry = {"name": name, "size": os.path.getsize(path), "state": "uploaded",
                     "content_type": "application/gzip",
                     "browser_download_url": f"{self.api_base}/{self.repo}/releases/download/{tag}/{name}"}
            if digest and name.endswith(".tar.gz"):
                entry["digest"] = "sha256:" + _file_sha256(path)
            entries.append(entry)
        self.releases.insert(0, {"tag_name": tag, "name": tag, "draft": False, "prerelease": prerelease,
                                 "assets": entries, "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ")})

    def handle(self, request):
        path = request.path.split("?")[0]
        if request.server.server_port == self.api.server_port:
            if path == f"/repos/{self.repo}/releases":
                body = json.dumps(self.releases).encode()
                etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
                if request.headers.get("If-None-Match") == etag:
                    return self.reply(request, 304, b"", {"ETag": etag})
                return self.reply(request, 200, body, {"ETag": etag, "Content-Type": "application/json"})
            prefix = f"/{self.repo}/releases/download/"
            if path.startswith(prefix):
                location = f"http://127.0.0.1:{self.assets.server_port}/assets/{path[len(prefix):]}"
                return self.reply(request, 302, b"", {"Location": location})
            return self.reply(request, 404, b'{"message": "Not Found"}')
        tag, _, name = path[len("/assets/"):].partition("/")
        return self.send_file(request, os.path.join(self.folder, os.path.basename(tag), os.path.basename(name)))

    def send_file(self, request, path):
        import shutil

        try:
            size = os.path.getsize(path)
        except OSError:
            return self.reply(request, 404, b"Not Found")
        start = 0
        match = re.match(r"bytes=(\d+)-$", request.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            if start >= size:
                return self.reply(request, 416, b"", {"Content-Range": f"bytes */{size}"})
        request.send_response(206 if match else 200)
        request.send_header("Content-Length", str(size - start))
        request.send_header("Content-Type", "application/octet-stream")
        if match:
            request.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        request.end_headers()
        with open(path, "rb") as handle:
            handle.seek(start)
            request.wfile.write(handle.read()) if size - start < CHUNK else shutil.copyfileobj(handle, request.wfile, CHUNK)

    @staticmethod
    def reply(request, status, body, headers=None):
        request.send_response(status)
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def close(self):
        for httpd in (self.api, self.assets):
            httpd.shutdown()
            httpd.server_close()


def cmd_demo(ctx, args):
    """The whole flow in a throwaway sandbox: tree, releases, server, DB."""
    import tempfile

    sandbox = tempfile.mkdtemp(prefix="xcvm-demo-")
    root = os.path.join(sandbox, "home", "xc_vm")
    say = print
    say(f"sandbox: {sandbox}")
    server = database_server(sandbox)
    database = f"xcvm_demo_{os.urandom(3).hex()}"
    releases = ReleaseServer("Vateron-Media/XC_VM", os.path.join(sandbox, "releases"))
    admin = None
    try:
        os.makedirs(os.path.join(sandbox, "releases"))
        www = {"www/index.php": b"<?php echo 'panel';\n", "www/old_page.php": b"<?php // gone in 1.1.0\n",
               "includes/cli/update.php": b"<?php\n", "status": b"#!/bin/sh\nexit 0\n"}
        build_release(os.path.join(sandbox, "installed.tar.gz"), "1.0.0", www)
        _extract_plainly(os.path.join(sandbox, "installed.tar.gz"), root)
        for number in range(200):
            _write_file(os.path.join(root, "content", "vod", f"{number:03d}.ts"), b"\0" * 1024)
        _write_file(os.path.join(root, "bin", "nginx", "conf", "custom.conf"), b"# the operator's own\n")
        new = dict(www, **{"www/index.php": b"<?php echo 'panel 1.1.0';\n", "www/new_page.php": b"<?php\n",
                           "migrations/deleted_files.txt": b"www/old_page.php\n",
                           "bin/nginx/conf/custom.conf": b"# would clobber the operator's file: preserved\n"})
        del new["www/old_page.php"]
        for number in range(300):
            new[f"www/assets/{number:03d}.js"] = b"// asset %d\n" % number
        build_release(os.path.join(sandbox, "releases", "xc_vm.tar.gz"), "1.1.0", new)
        build_release(os.path.join(sandbox, "releases", "loadbalancer.tar.gz"), "1.1.0", new)
        releases.add_release("v1.1.0", ["xc_vm.tar.gz", "loadbalancer.tar.gz"])
        build_release(os.path.join(sandbox, "releases", "xc_vm.tar.gz"), "1.2.0-beta1", new)
        releases.add_release("v1.2.0-beta1", ["xc_vm.tar.gz"], prerelease=True)
        systemctl = os.path.join(sandbox, "systemctl")
        _write_file(systemctl, SYSTEMCTL_STAND_IN.encode(), 0o755)
        _write_file(os.path.join(sandbox, "active"), b"")
        os.makedirs(os.path.join(root, ".xcvm-update"), 0o700)   # ours: install runs in-process
        settings_file = os.path.join(sandbox, "xcvm-update.ini")
        _write_file(settings_file, b"[xcvm-update]\nhealth_timeout = 10\n")
        owner = f"{os.geteuid()}:{os.getegid()}"
        flags = ["--root", root, "--settings", settings_file, "--systemctl", systemctl, "--owner", owner,
                 "--api-base", releases.api_base, "-q"]
        if server:
            admin = create_panel_database(server, database)
            now = int(time.time())
            with admin.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO servers (id, server_name, is_main, enabled, status, last_check_ago, xc_vm_version)"
                    " VALUES (%s, %s, %s, %s, %s, %s, '1.0.0')",
                    [(1, "main", 1, 1, 1, now), (2, "lb-1", 0, 1, 1, now), (3, "lb-2", 0, 1, 1, now),
                     (4, "lb-offline", 0, 1, 1, now - 3600), (5, "lb-disabled", 0, 0, 1, now)])
                cursor.execute("INSERT INTO signals (server_id, time, custom_data) VALUES (1, %s, %s)",
                               (now, json.dumps({"action": "update"})))
            write_panel_config(os.path.join(root, "config", "config.ini"), server, database)
            private = " (private mariadbd)" if server[4] else ""
            say(f"database: {database} on {server[0]}:{server[1]}{private}")
            say("admin clicked Update: signal inserted for server 1; running the cron's poll ...")
            command = "poll"
        else:
            write_panel_config(os.path.join(root, "config", "config.ini"), ("127.0.0.1", 9, "demo", ""), database)
            say("no database: PyMySQL is not importable, or no MariaDB answers at XCVM_TEST_DB or "
                "127.0.0.1:3306 and mariadbd is not installed;")
            say("running 'update' without the database layer (no signals, no LB propagation)")
            command = "update"
        started = time.monotonic()
        code = main(flags + [command])
        say(f"{command} exited {code} in {time.monotonic() - started:.2f} s")
        _demo_account(root, sandbox, admin)
        return code
    finally:
        releases.close()
        if admin and not args.keep:
            with admin.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS `{database}`")
        if admin:
            admin.close()
        if server and server[4] and not args.keep:
            server[4].terminate()
            server[4].wait()
        if args.keep:
            print(f"kept for inspection: {sandbox}")
        else:
            _remove_tree(sandbox)


def _demo_account(root, sandbox, admin):
    settings_dir = os.path.join(root, ".xcvm-update")
    result = _read_json(os.path.join(settings_dir, "last_result.json")) or {}
    print("result: {}, {} -> {}".format(result.get("step"), result.get("from_version"), result.get("to_version")))
    print("verified: sha256 {} (the asset's digest), re-hashed from a private copy by install".format((result.get("archive_sha256") or "?")[:16]))
    print("files: {} added, {} replaced, {} removed; downtime {:.3f} s".format(
        result.get("added"), result.get("replaced"), result.get("removed"), result.get("downtime_seconds") or 0))
    with open(os.path.join(root, "bin/nginx/conf/custom.conf")) as handle:
        kept = handle.read().startswith("# the operator")
    segments = len(os.listdir(os.path.join(root, "content", "vod")))
    print(f"now installed: {tree_version(root)}; operator's custom.conf kept: {kept}; content/ files: {segments}")
    try:
        with open(os.path.join(sandbox, "systemctl.calls")) as handle:
            print("systemctl calls: " + ", ".join(line.strip() for line in handle))
    except FileNotFoundError:
        print("systemctl calls: none (the service was never touched)")
    if result.get("error"):
        print("error recorded: " + result["error"])
    if admin:
        with admin.cursor() as cursor:
            cursor.execute("SELECT server_id FROM signals WHERE custom_data LIKE '%update%' ORDER BY server_id")
            print("LB update signals created for servers: %s" % ([row[0] for row in cursor.fetchall()] or "none"))
            cursor.execute("SELECT xc_vm_version, status FROM servers WHERE id = 1")
            print("servers row of MAIN: version {}, status {}".format(*cursor.fetchone()))
            cursor.execute("SELECT error FROM mysql_syslog ORDER BY id")
            for (line,) in cursor.fetchall():
                print(f"  syslog: {line}")


def _write_file(path, data, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


def _extract_plainly(archive, destination):
    """The demo's pre-installed panel: our own trusted archive."""
    import tarfile

    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            target = os.path.join(destination, member.name)
            if member.isdir():
                os.makedirs(target, exist_ok=True)
            else:
                _write_file(target, tar.extractfile(member).read(), member.mode)


# ------------------------------------------------------------------------ cli

GLOBAL_OPTIONS = (
    ("root", "DIR", "the panel's root (default /home/xc_vm)"),
    ("config", "FILE", "the panel's config.ini (default ROOT/config/config.ini)"),
    ("settings", "FILE", "the updater's settings file (default /etc/xcvm-update.ini)"),
    ("state_dir", "DIR", "journal, log, backups (default ROOT/.xcvm-update)"),
    ("owner", "USER:GROUP", "owner of installed files (default xc_vm:xc_vm)"),
    ("service", "NAME", "the panel's systemd unit (default xc_vm)"),
    ("systemctl", "CMD", "systemctl command (default systemctl)"),
    ("api_base", "URL", "GitHub API base (default https://api.github.com)"),
    ("repo", "OWNER/NAME", "release repository (default Vateron-Media/XC_VM)"),
    ("channel", "stable|beta", "release channel (default: settings.update_channel)"),
)


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    for dest, metavar, text in GLOBAL_OPTIONS:
        common.add_argument("--" + dest.replace("_", "-"), dest=dest, metavar=metavar, help=text,
                            default=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more detail on stderr")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only errors on stderr")

    parser = argparse.ArgumentParser(
        prog="xcvm_update", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The XC_VM panel's updater: poll -> update -> install -> post-update.",
        epilog=EXIT_CODES_HELP)
    parser.add_argument("--version", action="version", version="xcvm-update " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(name, handler, text):
        sub = commands.add_parser(name, parents=[common], help=text, description=text, epilog=EXIT_CODES_HELP,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(handler=handler)
        return sub

    command("poll", cmd_poll, "cron, every minute, as root: recover, finalize, claim this node's update signal, update")
    command("check", cmd_check, "installed version, node type, newest release; exit 100 when an update is available")
    sub = command("update", cmd_update, "fetch the release for this node, verify it, hand it to install")
    sub.add_argument("--force", action="store_true", help="install even if not newer, and retry a failed update")
    sub.add_argument("--version", metavar="TAG", help="install this release tag")
    sub.add_argument("--url", metavar="URL", help="a manual archive instead of GitHub (needs --sha256)")
    sub.add_argument("--sha256", metavar="HEX", help="the manual archive's SHA-256")
    sub.add_argument("--download-only", action="store_true", help="stop after the verified download")
    sub = command("install", cmd_install, "privileged: the install transaction (run as root, through sudo)")
    sub.add_argument("archive", help="the release .tar.gz")
    sub.add_argument("hash", help="sha256:HEX, md5:HEX, or a bare 64/32-digit hex")
    sub.add_argument("--version", metavar="TAG", help="the version being installed (default: from the archive)")
    command("post-update", cmd_post_update, "finalize: version in the DB, LB signals, mark complete; safe to rerun")
    command("status", cmd_status, "installed version, update in progress, last outcome, backups (read-only)")
    command("rollback", cmd_rollback, "restore the newest kept backup through the same transaction")
    sub = command("demo", cmd_demo, "the whole flow end to end in a throwaway sandbox")
    sub.add_argument("--keep", action="store_true", help="leave the sandbox for inspection")
    return parser


WRITES_STATE = ("poll", "update", "install", "post-update", "rollback")


def main(argv=None):
    args = build_parser().parse_args(argv)
    for dest, _, _ in GLOBAL_OPTIONS:
        if not hasattr(args, dest):
            setattr(args, dest, None)
    args.json = getattr(args, "json", False)
    verbosity = 0 if getattr(args, "quiet", False) else 1 + getattr(args, "verbose", 0)
    if args.command == "demo":
        return cmd_demo(None, args)
    if args.command == "install" and os.environ.get("SUDO_UID", "0") != "0":
        given = [dest for dest, _, _ in GLOBAL_OPTIONS if getattr(args, dest) is not None]
        if given:   # a sudoers rule for install must not let its caller choose what root runs
            sys.stderr.write("error: install through sudo takes no --{}: set it in /etc/xcvm-update.ini\n".format(given[0].replace("_", "-")))
            return EXIT_USAGE
    try:
        settings = load_settings(args)
    except UpdateError as error:
        sys.stderr.write(f"error: {error}\n")
        return error.exit_code
    log_path = None
    if args.command in WRITES_STATE and (os.geteuid() == 0 or os.access(settings.state_dir, os.W_OK)):
        try:
            os.makedirs(settings.state_dir, 0o700, exist_ok=True)
            log_path = settings.state("update.log")
        except OSError as error:
            sys.stderr.write(f"error: cannot create the state dir {settings.state_dir}: {error.strerror}; run as root\n")
            return EXIT_ERROR
    log = Log(log_path, verbosity)
    ctx = Context(settings, log)
    try:
        return args.handler(ctx, args)
    except UpdateError as error:
        log.error(str(error))
        return error.exit_code
    except OSError as error:
        log.error(describe_os_error(error, args.command))
        return EXIT_ERROR
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    finally:
        ctx.close()
        if log.file:
            log.file.close()


if __name__ == "__main__":
    sys.exit(main())
