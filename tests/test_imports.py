"""A command imports only what it needs: start-up is most of a small export's time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("lm_eval", "matplotlib", "transformers", "accelerate", "datasets", "scipy.linalg", "pandas", "sklearn")


def _modules_after(code: str, env: dict | None = None) -> set[str]:
    """The modules loaded in a fresh interpreter after ``code`` runs."""
    script = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, **(env or {})})
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def _loaded(modules: set[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


def test_importing_the_cli_and_the_library_imports_nothing_heavy():
    for code in ("import llm_prune.cli", "import llm_prune"):
        modules = _modules_after(code)
        assert not [h for h in (*HEAVY, "torch", "numba") if _loaded(modules, h)], code
    # nor does the parser: --help, --version and a bad argument answer before torch is imported
    modules = _modules_after("import llm_prune.cli; llm_prune.cli.build_parser()")
    assert not [h for h in (*HEAVY, "torch", "numba") if _loaded(modules, h)]


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["--version"], 0), (["--method", "nope"], 2),
                                        (["--sparsity", "1.5"], 2), (["--pattern", "3:2"], 2)])
def test_help_version_and_bad_arguments_answer_without_importing_torch(tmp_path, args, code):
    done = _program("", tmp_path, *args)
    assert done.returncode == code, done.stderr
    assert (done.stdout if code == 0 else done.stderr).strip()  # the answer, on the right stream
    probe = _modules_after(f"from llm_prune.cli import main\nassert main({args!r}) == {code}")
    assert not _loaded(probe, "torch")


def test_every_verbs_help_answers_without_importing_torch():
    from llm_prune.cli import VERBS

    code = ("import sys\nfrom llm_prune.cli import main\n"
            f"assert all(main([verb, '--help']) == 0 for verb in {sorted(VERBS)!r})")
    assert not _loaded(_modules_after(code), "torch")


def test_the_parser_lists_every_built_in_method():
    # file names are method names (the parser reads only the names); in a fresh process, where
    # no test has registered a method of its own
    code = ("from llm_prune.commands import method_names\nfrom llm_prune.methods import METHODS\n"
            "assert method_names() == sorted(METHODS), (method_names(), sorted(METHODS))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_omp_export_imports_neither_transformers_nor_lm_eval_nor_matplotlib(tmp_path, tiny_llama):
    # The whole dense OMP export, as the CLI runs it, in a fresh process.
    code = (f"from llm_prune.cli import main\n"
            f"main([{str(tiny_llama)!r}, '--sparsity', '0.5', '--out', {str(tmp_path / 'out')!r}, '--quiet'])")
    modules = _modules_after(code, {"LLM_PRUNE_CACHE": str(tmp_path / "cache")})
    assert (tmp_path / "out" / "sparsity.json").is_file()
    assert _loaded(modules, "numba")  # the kernels ran...
    assert [h for h in HEAVY if _loaded(modules, h)] == []  # ...without scipy.linalg, and nothing else heavy
    env = json.loads((tmp_path / "out" / "sparsity.json").read_text())["run"]["environment"]
    assert env["transformers"] and env["numba"]  # versions still recorded, without importing transformers


def test_numba_code_that_calls_blas_still_works_after_the_kernels_started():
    pytest.importorskip("scipy")
    code = ("import llm_prune.kernels.magnitude, sys\n"
            "assert 'scipy.linalg' not in sys.modules\n"
            "import numba, numpy as np\n"
            "f = numba.njit(lambda a, b: np.dot(a, b))\n"
            "assert f(np.ones(3), np.ones(3)) == 3.0")
    _modules_after(code)


def _program(code: str, tmp_path, *args: str, after: str = "") -> subprocess.CompletedProcess:
    """``code`` then ``main()`` as the program runs it (argv from sys.argv), then a marker line
    and ``after``."""
    script = (f"import sys, atexit\nsys.argv = ['llm-prune', *{list(args)!r}]\n{code}\n"
              f"from llm_prune.cli import main\nmain()\nprint('main returned')\n{after}")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "LLM_PRUNE_CACHE": str(tmp_path / "cache")})


def test_the_program_ends_without_teardown_and_loses_nothing(tmp_path, tiny_llama):
    flag = tmp_path / "atexit-ran"
    out = tmp_path / "out"
    done = _program(f"atexit.register(lambda: open({str(flag)!r}, 'w').write('yes'))", tmp_path,
                    str(tiny_llama), "--sparsity", "0.5", "--out", str(out), "--quiet", "--json")
    assert done.returncode == 0, done.stderr
    assert "main returned" not in done.stdout  # the process ended inside main()...
    report = json.loads(done.stdout)  # ...with its whole output through the pipe
    assert report["achieved"] == json.loads((out / "sparsity.json").read_text())["achieved"]
    assert flag.read_text() == "yes"  # and the atexit handlers run

    bad = _program("", tmp_path, str(tiny_llama), "--sparsity", "2")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["llm-prune: error: sparsity must be in [0, 1), got '2'"]


def test_the_program_waits_for_a_thread_still_at_work(tmp_path):
    flag = tmp_path / "thread-done"
    # the thread works until main() has returned: alive whenever main() decides how to end
    code = (f"import threading\nreturned = threading.Event()\n"
            f"threading.Thread(target=lambda: (returned.wait(60), open({str(flag)!r}, 'w').write('yes'))).start()")
    done = _program(code, tmp_path, "--version", after="returned.set()")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"llm-prune {__import__('llm_prune').__version__}", "main returned"]
    assert flag.read_text() == "yes"
