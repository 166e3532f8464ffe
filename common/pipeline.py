"""Running the numbered scripts as stages of a pipeline (reproduce.py): a stage whose output and
manifest exist is skipped, so a killed or failed pipeline resumes where it stopped. A rerun refuses an output
that another command made (other settings), and reruns a stage whose input was remade after its output.

A run is a list of `Stage` records (script, output, settings, method); `command` is the one place their command
lines are spelled: a setting's name with dashes is its flag, a method's knobs are its 04_decode.py flags."""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from common.io import write_json

# the stages that load models and take --device
MODEL_STAGES = ("02_weight.py", "03_train.py", "04_decode.py", "05_evaluate.py")


@dataclass(frozen=True)
class Stage:
    """One step of a run. With a name it is a stage (skipped when its output exists); without, a step run every
    time (tables, comparisons)."""
    script: str                   # a script and its subcommand: "05_evaluate.py metrics"
    output: str                   # its --output
    settings: dict                # flag name (underscores) -> value; None: left out, True: a bare flag, a tuple:
    #                               the flag once a value
    name: str = None
    method: tuple = None          # (method name, {knob: value}): --method and the knobs' flags
    inputs: tuple = ()            # positional arguments after the script


def command(stage):
    """The command line of a stage (strings)."""
    cmd = [*stage.script.split(), *stage.inputs]
    settings = {**(method_settings(*stage.method) if stage.method else {}), **stage.settings, "output": stage.output}
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif isinstance(value, tuple):
            for v in value:
                cmd += [flag, str(v)]
        elif value is not None:
            cmd += [flag, str(value)]
    return cmd


def method_settings(name, knobs):
    """--method NAME and the given knobs, checked against the method's own (the names its params() records, which
    04_decode.py turns into flags); a value the method cannot run with is refused here, before any stage runs."""
    from common.search import make_method

    known = make_method(name, **knobs).params()
    unknown = sorted(set(knobs) - set(known))
    if unknown:
        raise ValueError(f"method {name} has no knob {', '.join(unknown)} (it has {', '.join(known) or 'none'})")
    return {"method": name, **knobs}


class Pipeline:
    def __init__(self, name, redo="", cost_path=None, commands_path=None, device=None, scripts=None):
        self.name = name
        # The folder a script named without a folder runs from (reproduce.py: its own folder), so a pipeline runs
        # from any working folder; commands keep the name as given, so a record stays valid when the folder moves.
        self.scripts = scripts
        self.device = device  # given to every model stage (a GPU scale must not fall back to the CPU unseen)
        self.redo = set(redo.split(",")) if redo else set()
        self.timings = []   # (stage, seconds) of the stages run now
        self.started = time.time()
        self.cost_path = cost_path  # {stage: seconds}, updated after every stage: it survives kills and resumes
        self.commands_path = commands_path  # {stage: the command that made its output}

    def done(self, output):
        return os.path.exists(output) and os.path.exists(manifest_of(output))

    def stage(self, name, output, *cmd):
        """Run `python CMD...` unless OUTPUT (with its manifest) exists; exit with a message on failure."""
        cmd = [str(c) for c in cmd]
        if self.device and cmd[0] in MODEL_STAGES:
            cmd += ["--device", self.device]
        if self.done(output) and name not in self.redo and "all" not in self.redo:
            made_by = read_record(self.commands_path).get(name)
            if made_by is not None and canonical(made_by) != canonical(cmd):
                then, now = first_difference(canonical(made_by), canonical(cmd))
                print(f"error: {self.name}: stage {name}: {output} was made with other settings (then {then}, now "
                      f"{now}); rerun with --redo {name} to replace it, or use another --out",
                      file=sys.stderr)
                sys.exit(2)
            finished = made_at(output)
            remade = [p for p in input_paths(cmd[1:]) if p != output and made_at(p) > finished]
            if not remade:
                if made_by is None:
                    self._record(name, cmd)
                print(f"[skip] {name}: {output} exists", flush=True)
                return
            print(f"[rerun] {name}: its input {remade[0]} was remade after {output}", flush=True)
        # a finished output being replaced (--redo, or a remade input) is stale: a stage resumed from it would
        # keep its rows, so the flag is dropped for this run (the old output stays until the new one is complete)
        argv = [c for c in cmd if c != "--resume"] if self.done(output) else cmd
        print(f"\n[run] {name}: {' '.join(argv)}", flush=True)
        t0 = time.time()
        if subprocess.run([sys.executable, self.script(argv[0]), *argv[1:]]).returncode != 0:
            sys.exit(f"{self.name}: stage {name} failed (its message is above); fix it and rerun: finished "
                     "stages are kept")
        self.timings.append((name, time.time() - t0))
        if self.cost_path:
            write_json(self.cost_path, {**self.costs(), name: round(time.time() - t0, 1)})
        self._record(name, cmd)

    def run_stages(self, stages):
        """Run a list of stages in order; a plain function in the list is a step of this process, and the stages
        it returns (if any) run next: stages whose settings are read from an earlier stage's output."""
        for st in stages:
            if callable(st):
                self.run_stages(st() or [])
            elif st.name:
                self.stage(st.name, st.output, *command(st))
            else:
                self.run(*command(st))

    def _record(self, name, cmd):
        if self.commands_path:
            write_json(self.commands_path, {**read_record(self.commands_path), name: cmd})

    def costs(self):
        """Seconds of every stage run so far, in this run or an earlier one."""
        return read_record(self.cost_path)

    def run(self, script, *args):
        """An always-run step (tables, comparisons): its output, if any, is rewritten each time."""
        subprocess.run([sys.executable, self.script(str(script)), *map(str, args)], check=True)

    def script(self, name):
        """Where a stage's script is: `name` in the scripts folder (an absolute name stays as it is)."""
        return os.path.join(self.scripts, name) if self.scripts else name

    def summary(self):
        return ", ".join(f"{n} {t:.0f}s" for n, t in self.timings)


def manifest_of(output):
    """A stage's manifest: OUTPUT/manifest.json for a folder, OUTPUT.manifest.json for a file."""
    return os.path.join(output, "manifest.json") if os.path.isdir(output) else output + ".manifest.json"


def made_at(path):
    """When a stage output was completed (its manifest is written last), or a plain file last changed."""
    manifest = manifest_of(path)
    return os.path.getmtime(manifest if os.path.exists(manifest) else path)


def input_paths(args):
    """The arguments that name existing files or folders (also NAME=PATH), the script itself left out: a
    new version of the code does not rerun finished stages."""
    paths = []
    for arg in args:
        path = arg if os.path.exists(arg) else arg.split("=", 1)[-1]
        if os.path.exists(path):
            paths.append(path)
    return paths


def canonical(cmd):
    """A command with its flags in name order, each flag's occurrences (and values) in their own order: argparse
    reads `--a 1 --b 2` as `--b 2 --a 1`, so the same settings written in another order are the same command
    (a rerun after the command lines were reordered skips its finished stages)."""
    head, groups, last = [], {}, None
    for token in cmd:
        if token.startswith("--"):
            last = groups.setdefault(token, [])
            last.append([token])
        elif last is None:
            head.append(token)  # the script, its subcommand and positional arguments
        else:
            last[-1].append(token)
    return head + [token for flag in sorted(groups) for occurrence in groups[flag] for token in occurrence]


def first_difference(a, b):
    """Where two commands part, quoted, as (a's, b's); "nothing" where one ends first."""
    for x, y in zip(a, b):
        if x != y:
            return repr(x), repr(y)
    rest = lambda cmd, n: repr(" ".join(cmd[n:])) if len(cmd) > n else "nothing"  # noqa: E731
    return rest(a, len(b)), rest(b, len(a))


def read_record(path):
    """A record the pipeline keeps (stage seconds, stage commands); empty before the first stage or when the
    pipeline keeps none (path None)."""
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {}
