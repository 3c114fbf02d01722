"""Triton Python-backend model: a policy artifact's plan (its sampler, warm-started chunks, un-normalization)
as the runner runs it, each graph a BLS call to its own model in the repository. A request is one decision of
one episode: a seed, the episode's id, the decision's index in it, and the observation history (one tensor per
observation input, [n_obs_steps, dim], raw units); the response is the action chunk ([horizon, action_dim],
raw units). With warm-started chunks (core.warm_start) the model keeps each episode's last chunk and starts a
later decision from it, so an episode's requests must come in order (decision 0 first); one instance holds the
episodes (the repository gives this model one)."""

from collections import OrderedDict

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from core.limits import MAX_SEED
from core.warm_start import WarmStart
from serving.triton_models.bls import artifact_runner

MAX_EPISODES = 100_000  # episodes whose last chunk is kept (the oldest forgotten first)


class TritonPythonModel:
    def initialize(self, args):
        self.runner = artifact_runner(args)
        sampling, chunking = self.runner.plan.sampling, self.runner.plan.chunking
        self.warm = None if sampling.warm_start is None else WarmStart(sampling, chunking)
        self.observations = [(c.name, tuple(c.shape)) for c in self.runner.plan.conditioning.observation]
        self.previous = OrderedDict()  # episode -> its last chunk (model space)

    def _parse(self, request):
        """(seed, episode, decision, {observation name: tensor [n_obs_steps, dim]}) of one request."""
        scalars = []
        for name, low, high in (("seed", 0, MAX_SEED), ("episode", 0, 2**62), ("decision", 0, 2**62)):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            value = None if tensor is None else tensor.as_numpy().reshape(-1)
            if value is None or value.size != 1 or not low <= int(value[0]) < high:
                raise ValueError(f"one {name} per request, in {low}..{high - 1}")
            scalars.append(int(value[0]))
        row = {}
        for name, shape in self.observations:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing observation '{name}'")
            value = tensor.as_numpy().astype(np.float32).reshape(shape)
            if not np.isfinite(value).all():
                raise ValueError(f"observation '{name}' holds NaN or infinity")
            row[name] = torch.from_numpy(value.copy())
        seed, episode, decision = scalars
        if self.warm is not None and decision > 0 and episode not in self.previous:
            raise ValueError(f"episode {episode} has no earlier decision here: send its decision 0 first")
        return seed, episode, decision, row

    def _act(self, parsed):
        """Each parsed request's final chunk: the whole loop at an episode's first decision (or every decision
        without warm starts), the loop's tail from the episode's last chunk at a later one."""
        finals = [None] * len(parsed)
        is_warm = [self.warm is not None and decision > 0 for _, _, decision, _ in parsed]
        for warm in (False, True):
            group = [k for k in range(len(parsed)) if is_warm[k] == warm]
            if not group:
                continue
            seeds, rows = [parsed[k][0] for k in group], [parsed[k][3] for k in group]
            if warm:
                prior = torch.stack([self.previous[parsed[k][1]] for k in group])
                final = self.runner.sample(seeds, rows, plan=self.warm.plan, start=self.warm.start(prior, seeds))
            else:
                final = self.runner.sample(seeds, rows)
            for k, f in zip(group, final, strict=True):
                finals[k] = f
        if self.warm is not None:
            for (_, episode, _, _), final in zip(parsed, finals, strict=True):
                self.previous[episode] = final
                self.previous.move_to_end(episode)
            while len(self.previous) > MAX_EPISODES:
                self.previous.popitem(last=False)
        return finals

    def execute(self, requests):
        parsed, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                parsed.append((i, self._parse(request)))
            except Exception as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)[:500]))
        if parsed:
            try:
                actions = self.runner.decode(torch.stack(self._act([p for _, p in parsed]))).numpy()
                for k, (i, _) in enumerate(parsed):
                    action = actions[k : k + 1].astype(np.float32)
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("action", action)])
            except Exception as exc:
                for i, _ in parsed:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)[:500]))
        return responses
