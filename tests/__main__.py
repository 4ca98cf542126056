"""Run every suite: python3 -m tests [--target PATH] [-k PATTERN] [-v].

--target is the command under test: xcvm_update.py (the default) or the
built dist/xcvm_update.pyz.  The last line is 'N passed, N failed'.
"""

import argparse
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(prog="python3 -m tests", description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="xcvm_update.py or a built .pyz (default: the module)")
    parser.add_argument("-k", dest="patterns", action="append", help="only tests matching this substring")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    if args.target:
        os.environ["XCVM_UPDATE_TARGET"] = os.path.abspath(args.target)
    loader = unittest.TestLoader()
    if args.patterns:
        loader.testNamePatterns = [f"*{pattern}*" for pattern in args.patterns]
    suite = loader.discover(HERE, top_level_dir=os.path.dirname(HERE))
    result = unittest.TextTestRunner(verbosity=2 if args.verbose else 1).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print("target: {} (Python {}){}".format(os.environ.get("XCVM_UPDATE_TARGET", "xcvm_update.py"),
                                        sys.version.split()[0], f", {skipped} skipped" if skipped else ""))
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not result.testsRun else 0


if __name__ == "__main__":
    sys.exit(main())
