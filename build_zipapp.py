"""Build dist/xcvm_update.pyz: xcvm_update.py plus a vendored, pinned PyMySQL.

    python3 build_zipapp.py [--output dist/xcvm_update.pyz]

The PyMySQL wheel named in requirements.txt is taken from build/wheels/ (or
downloaded there with pip) and checked against the pinned SHA-256 before a
byte of it is packed.  Every zip entry gets a fixed timestamp, mode and order,
so two builds of the same sources are byte-for-byte identical.
"""

import argparse
import hashlib
import inspect
import os
import re
import subprocess
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
WHEELS = os.path.join(HERE, "build", "wheels")
EPOCH = (1980, 1, 1, 0, 0, 0)


def pyz_main():
    """The pyz's __main__.py: run xcvm_update with a bytecode cache.

    zipimport never writes bytecode, so each run would compile xcvm_update and
    PyMySQL again: about 0.1 s, most of an idle cron poll.  This finder
    compiles each module of the archive once per Python version and keeps the
    code in ~/.cache/xcvm-update (or $XDG_CACHE_HOME), keyed by the source's
    hash, and only in a directory that this user alone can write.
    """
    import hashlib
    import importlib.util
    import marshal
    import os
    import sys
    import zipimport

    archive = os.path.dirname(os.path.abspath(__file__))
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "xcvm-update")
    try:
        os.makedirs(cache, 0o700, exist_ok=True)
        info = os.stat(cache)
        usable = info.st_uid == os.geteuid() and not info.st_mode & 0o022
    except OSError:
        usable = False

    class CachedZipFinder:
        def __init__(self):
            self.zip = zipimport.zipimporter(archive)

        def find_spec(self, name, path=None, target=None):
            base = name.replace(".", "/")
            for inner, package in ((base + "/__init__.py", True), (base + ".py", False)):
                try:
                    self.source = self.zip.get_data(inner)
                except OSError:
                    continue
                spec = importlib.util.spec_from_loader(name, self, origin=os.path.join(archive, inner),
                                                       is_package=package)
                spec.has_location = True
                return spec
            return None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            origin = module.__spec__.origin
            source = self.source
            key = hashlib.sha256(importlib.util.MAGIC_NUMBER + source).hexdigest()[:40]
            cached = os.path.join(cache, key)
            code = None
            if usable:
                try:
                    with open(cached, "rb") as handle:
                        code = marshal.loads(handle.read())
                except (OSError, ValueError, EOFError):
                    code = None
            if code is None:
                code = compile(source, origin, "exec", dont_inherit=True)
                if usable:
                    try:
                        with open(cached + ".tmp", "wb") as handle:
                            handle.write(marshal.dumps(code))
                        os.replace(cached + ".tmp", cached)
                    except OSError:
                        pass
            exec(code, module.__dict__)  # noqa: S102  the archive's own module, as import would run it

    sys.meta_path.insert(0, CachedZipFinder())
    import xcvm_update

    sys.exit(xcvm_update.main())


MAIN = (inspect.getsource(pyz_main) + "\n\npyz_main()\n").encode()


def pinned_requirement():
    """(name, version, sha256) of the one line in requirements.txt."""
    with open(os.path.join(HERE, "requirements.txt")) as handle:
        for line in handle:
            match = re.match(r"^\s*([A-Za-z0-9_.-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
            if match:
                return match.groups()
    sys.exit("requirements.txt needs a line NAME==VERSION --hash=sha256:HEX")


def find_wheel(name, version, sha256):
    """The pinned wheel, downloaded with pip if needed, verified by hash."""
    prefix = (f"{name}-{version}-").lower()
    for attempt in range(2):
        if os.path.isdir(WHEELS):
            for entry in sorted(os.listdir(WHEELS)):
                if entry.lower().startswith(prefix) and entry.endswith(".whl"):
                    path = os.path.join(WHEELS, entry)
                    with open(path, "rb") as handle:
                        if hashlib.sha256(handle.read()).hexdigest() == sha256:
                            return path
                    sys.exit(f"{path} does not match the hash pinned in requirements.txt: delete it")
        if attempt == 0:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            "--require-hashes", "-r", os.path.join(HERE, "requirements.txt"), "-d", WHEELS], check=True)
    sys.exit(f"pip did not provide {name} {version}")


def add(archive, name, data, mode=0o644):
    info = zipfile.ZipInfo(name, EPOCH)
    info.external_attr = (0o100000 | mode) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data, compresslevel=9)


def build(output):
    name, version, sha256 = pinned_requirement()
    wheel = find_wheel(name, version, sha256)
    entries = {"__main__.py": MAIN}
    with open(os.path.join(HERE, "xcvm_update.py"), "rb") as handle:
        entries["xcvm_update.py"] = handle.read()
    with zipfile.ZipFile(wheel) as source:
        for member in source.namelist():
            top = member.split("/")[0]
            if top == "pymysql" and member.endswith(".py") or top.endswith(".dist-info") and "LICENSE" in member:
                entries[member] = source.read(member)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    temporary = output + ".tmp"
    with open(temporary, "wb") as handle:
        handle.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(handle, "w") as archive:
            for entry in sorted(entries):
                add(archive, entry, entries[entry])
    os.chmod(temporary, 0o755)
    os.replace(temporary, output)
    with open(output, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    print(f"built {output} ({len(entries)} files, sha256 {digest})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join(HERE, "dist", "xcvm_update.pyz"))
    build(parser.parse_args().output)
