"""pytest set-up shared by tests/ and the nbval run over nbs/."""


def pytest_collection_modifyitems(items):
    # nbdev-clean blanks every execution_count, and nbval reads a blank count as "this reference cell was never
    # run" and refuses to compare it. Our notebooks are always saved after a full run, so give each cell a count.
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is not None and getattr(cell, "cell_type", None) == "code" and cell.get("execution_count") is None:
            cell["execution_count"] = 1
