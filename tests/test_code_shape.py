"""Code a maintainer can live in: no function in the package runs over 80 lines unless a comment right above
it (`# long: <why>`) says why it is better in one piece."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onnxprune"
LIMIT = 80


def long_functions() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            reason = lines[first - 2].strip() if first >= 2 else ""
            if length > LIMIT and not reason.startswith("# long:"):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_runs_over_80_lines_without_a_reason():
    assert long_functions() == [], "split these, or say why above them with `# long: <reason>`"
