"""Write the data of a ``torch.save`` file that also holds other objects, as a file the project reads.

``python tools/data_only.py IN OUT`` reads IN with every object that is not data left as an inert placeholder
(:func:`dassl.utils.safe_load.read_data_only`: nothing in the file runs), drops those placeholders and writes the
rest (tensors, numbers, strings, containers) to OUT with ``torch.save``; it lists what it dropped. For an upstream
Dassl checkpoint that is e.g. the scheduler's successor object, while ``state_dict`` and ``epoch`` stay, so
``train.py --eval-only --model-dir`` can load the copy. Exit 2 with one line when IN cannot be read or holds no
data at all.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # entry point: CoOp/ importable


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/data_only.py", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a torch.save file (checkpoint, weights, cache) the project refuses to unpickle")
    p.add_argument("dst", help="where to write its data")
    args = p.parse_args(argv)
    import torch

    from dassl.utils.errors import UserError
    from dassl.utils.safe_load import data_of, load_torch_file, read_data_only
    from dassl.utils.tools import atomic_write_bytes

    try:
        obj, dropped = read_data_only(args.src)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data = data_of(obj)
    if data is None:
        print(f"error: {args.src} holds no data, only an object of {', '.join(dropped)}", file=sys.stderr)
        return 2
    buf = io.BytesIO()
    torch.save(data, buf)
    atomic_write_bytes(args.dst, buf.getvalue())
    load_torch_file(args.dst, "written file")  # what the project will do with it: weights-only
    print(f"wrote {args.dst}" + (f"; dropped the objects of {', '.join(dropped)}" if dropped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
