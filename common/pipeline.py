"""Running the numbered scripts as stages of a pipeline (demo.py, reproduce.py): a stage whose output and
manifest exist is skipped, so a killed or failed pipeline resumes where it stopped."""
import json
import os
import subprocess
import sys
import time

from common.io import write_json


class Pipeline:
    def __init__(self, name, redo="", cost_path=None):
        self.name = name
        self.redo = set(redo.split(",")) if redo else set()
        self.timings = []   # (stage, seconds) of the stages run now
        self.started = time.time()
        self.cost_path = cost_path  # {stage: seconds}, updated after every stage: it survives kills and resumes

    def done(self, output):
        return os.path.exists(output) and (os.path.exists(output + ".manifest.json") or
                                           os.path.exists(os.path.join(output, "manifest.json")))

    def stage(self, name, output, *cmd):
        """Run `python CMD...` unless OUTPUT (with its manifest) exists; exit with a message on failure."""
        if self.done(output) and name not in self.redo and "all" not in self.redo:
            print(f"[skip] {name}: {output} exists", flush=True)
            return
        print(f"\n[run] {name}: {' '.join(map(str, cmd))}", flush=True)
        t0 = time.time()
        if subprocess.run([sys.executable, *map(str, cmd)]).returncode != 0:
            sys.exit(f"{self.name}: stage {name} failed (its message is above); fix it and rerun: finished "
                     "stages are kept")
        self.timings.append((name, time.time() - t0))
        if self.cost_path:
            write_json(self.cost_path, {**self.costs(), name: round(time.time() - t0, 1)})

    def costs(self):
        """Seconds of every stage run so far, in this run or an earlier one."""
        if self.cost_path and os.path.exists(self.cost_path):
            with open(self.cost_path, encoding="utf-8") as f:
                return json.load(f)
        return {}

    def run(self, *cmd):
        """An always-run step (tables, comparisons): its output, if any, is rewritten each time."""
        subprocess.run([sys.executable, *map(str, cmd)], check=True)

    def summary(self):
        return ", ".join(f"{n} {t:.0f}s" for n, t in self.timings)
