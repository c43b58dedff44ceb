"""inspect_ai task: evalcluster's capability probes, one sample per row of a JSONL file.

bench/peers.py writes the JSONL from `evaluators.load_probe_set("capability")` at run time and runs
`inspect eval capability_inspect.py -T probes=<file> -T system=<prompt> --epochs 4 ...`.
"""

import json

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.scorer import includes
from inspect_ai.solver import generate, system_message


@task
def capability(probes: str, system: str = "You are a helpful assistant.") -> Task:
    """The probes in `probes` (JSONL of {id, prompt, expected}) behind the system prompt `system`."""
    with open(probes, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    samples = [Sample(id=r["id"], input=r["prompt"], target=r.get("expected") or "") for r in rows]
    return Task(dataset=MemoryDataset(samples, name="capability"),
                solver=[system_message(system), generate()], scorer=includes())
