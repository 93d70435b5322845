"""Copy the area docs into README between the docs markers (headings moved one level down).

Usage: python docs/assemble_readme.py
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["router.md", "batch.md", "bench.md", "mock-engine.md", "torch-engine.md", "chaos.md"]
BEGIN, END = "<!-- docs:begin -->", "<!-- docs:end -->"


def demote(text: str) -> str:
    out, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        out.append("#" + line if line.startswith("#") and not fence else line)
    return "\n".join(out).replace("](bench-example", "](docs/bench-example")


def main() -> None:
    readme = (ROOT / "README.md").read_text()
    body = "\n\n".join(demote((ROOT / "docs" / name).read_text().strip()) for name in ORDER)
    block = f"{BEGIN}\n\n{body}\n\n{END}"
    if BEGIN in readme:
        a, b = readme.index(BEGIN), readme.index(END) + len(END)
        readme = readme[:a] + block + readme[b:]
    else:
        readme = readme.rstrip() + "\n\n" + block + "\n"
    (ROOT / "README.md").write_text(readme)


if __name__ == "__main__":
    main()
