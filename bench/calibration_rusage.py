"""`kvbm-codec calibrate` with each phase's CPU time, kernel time and minor page faults printed beside
its wall time: where a calibration's time goes, including what the wall clock alone hides (page
faults from large tensors mapped fresh, BLAS threads oversubscribing the cores).

    python bench/calibration_rusage.py --out /tmp/cal.kvtc [any other `kvbm-codec calibrate` options]
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from kvbm_codec.calibration import calibrate as C

_phase = C.PhaseClock.phase


@contextmanager
def _measured(self: C.PhaseClock, name: str) -> Iterator[None]:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    with _phase(self, name):
        yield
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"calibration: [{name}] user {r1.ru_utime - r0.ru_utime:.1f} s, "
        f"sys {r1.ru_stime - r0.ru_stime:.1f} s, minor faults {r1.ru_minflt - r0.ru_minflt}",
        file=sys.stderr,
        flush=True,
    )


def main() -> None:
    from kvbm_codec.cli import app

    C.PhaseClock.phase = _measured  # type: ignore[method-assign]
    sys.argv = ["kvbm-codec", "calibrate", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
