"""Plain-text formatting shared by every table the tool prints: sizes, changes, boxes."""
from __future__ import annotations


def human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def change(before: float, after: float, fmt=human) -> str:
    if before == 0:
        return fmt(after)
    return f"{fmt(after)} ({(after - before) / before:+.1%})"


def box_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(l, m, r):
        return l + m.join("─" * (w + 2) for w in widths) + r

    def row(cells):
        return "│" + "│".join(f" {str(c):<{w}} " if i == 0 else f" {str(c):>{w}} "
                              for i, (c, w) in enumerate(zip(cells, widths))) + "│"

    out = [line("┌", "┬", "┐"), row(header), line("├", "┼", "┤")]
    out += [row(r) for r in rows]
    out.append(line("└", "┴", "┘"))
    return "\n".join(out)


def threads_text(n: int) -> str:
    return "threads chosen by onnxruntime" if n == 0 else f"{n} thread" + ("s" if n != 1 else "")
