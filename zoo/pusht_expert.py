"""A scripted PushT expert on the simulator's privileged state (neither gym-pusht nor LeRobot ships one):
a greedy push planner. At each decision it simulates candidate pushes (a contact point on the T's outline,
approached along the outward normal, pushed in by 1.5-50 px) in a scratch copy of the physics, takes the
one that brings the block's outline closest to the goal's (mean keypoint distance; when none does, the one
that brings its center closest), routes the agent around the block to the approach point (shortest path
on a visibility graph of the block inflated by the agent's radius), pushes, and backs off.

Measured on seeds 1000-1099: see zoo.policy's demonstration record (success rate, steps)."""

from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np

# The T in body coordinates (gym-pusht's add_tee, scale 30): the bar, then the stem, as one outline.
OUTLINE = np.array([(-60, 0), (60, 0), (60, 30), (15, 30), (15, 120), (-15, 120), (-15, 30), (-60, 30)], float)
CENTER = np.array([[0.0, 45.0]])  # the T's center of mass
GOAL = (256.0, 256.0, math.pi / 4)  # gym-pusht's goal pose
AGENT_RADIUS = 15.0
LOW, HIGH = 20.0, 492.0  # where the agent's center may go (walls at 5 and 506)
APPROACH = 12.0  # gap between the agent and the block before a push
PUSH_STEPS = 4  # control steps a push lasts (the planner simulates the same)
MAX_STEP = 60.0  # farthest target from the agent while travelling (px per control step)


def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _world(position: np.ndarray, angle: float, local: np.ndarray) -> np.ndarray:
    return local @ _rotation(angle).T + position


GOAL_OUTLINE = _world(np.array(GOAL[:2]), GOAL[2], OUTLINE)
GOAL_CENTER = _world(np.array(GOAL[:2]), GOAL[2], CENTER)[0]


def outline_error(position: np.ndarray, angle: float) -> float:
    """Mean distance (px) of the T's outline vertices from the goal's."""
    return float(np.linalg.norm(_world(position, angle, OUTLINE) - GOAL_OUTLINE, axis=1).mean())


def center_error(position: np.ndarray, angle: float) -> float:
    return float(np.linalg.norm(_world(position, angle, CENTER)[0] - GOAL_CENTER))


def _contacts(spacing: float = 8.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Points along the outline every `spacing` px, with their outward normals (body coordinates)."""
    import shapely.geometry as sg

    polygon = sg.Polygon(OUTLINE)
    found = []
    for i, a in enumerate(OUTLINE):
        d = OUTLINE[(i + 1) % len(OUTLINE)] - a
        length = float(np.linalg.norm(d))
        normal = np.array([d[1], -d[0]]) / length
        if polygon.contains(sg.Point(*(a + d / 2 + normal))):
            normal = -normal
        k = max(1, int(length // spacing))
        found += [(a + (j + 0.5) / k * d, normal) for j in range(k)]
    return found


class _Scratch:
    """A second PushT whose physics replays a candidate push from the live env's block pose."""

    def __init__(self) -> None:
        from core.environments.pusht import make_env

        self.env = make_env()
        self.env.reset(seed=0)

    def push(self, live: Any, start: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
        from pymunk.vec2d import Vec2d

        e = self.env
        e.block.angle, e.block.position = live.block.angle, live.block.position
        e.block.velocity, e.block.angular_velocity = (0, 0), 0
        e.agent.position, e.agent.velocity = Vec2d(*start), Vec2d(0, 0)
        goal = Vec2d(*target)
        for _ in range(PUSH_STEPS * int(1 / (e.dt * e.control_hz))):  # the env's PD control, as env.step runs it
            e.agent.velocity += (e.k_p * (goal - e.agent.position) - e.k_v * e.agent.velocity) * e.dt
            e.space.step(e.dt)
        return np.array(e.block.position), e.block.angle


def _route(start: np.ndarray, goal: np.ndarray, block: Any) -> list[np.ndarray] | None:
    """Waypoints from `start` to `goal` that keep the agent off the block (None: no way found)."""
    import shapely.geometry as sg

    core = block.buffer(AGENT_RADIUS + 2)

    def free(a: np.ndarray, b: np.ndarray) -> bool:
        return sg.LineString([a, b]).intersection(core).length < 0.5

    if free(start, goal):
        return [goal]
    ring = np.array(block.buffer(AGENT_RADIUS + 12, join_style=2).exterior.coords)[:-1]
    inside = [p for p in ring if LOW - 4 < p[0] < HIGH + 4 and LOW - 4 < p[1] < HIGH + 4]
    nodes = [start, goal, *inside]
    dist, prev = [math.inf] * len(nodes), [-1] * len(nodes)
    dist[0], queue = 0.0, [(0.0, 0)]
    while queue:
        d, i = heapq.heappop(queue)
        if d > dist[i] or i == 1:
            continue
        for j in range(1, len(nodes)):
            if j != i and free(nodes[i], nodes[j]):
                nd = d + float(np.linalg.norm(nodes[i] - nodes[j]))
                if nd < dist[j]:
                    dist[j], prev[j] = nd, i
                    heapq.heappush(queue, (nd, j))
    if prev[1] < 0:
        return None
    path, k = [], 1
    while k != 0:
        path.append(nodes[k])
        k = prev[k]
    return path[::-1]


def _block_polygon(env: Any) -> Any:
    import shapely.geometry as sg

    return sg.Polygon(_world(np.array(env.block.position), env.block.angle, OUTLINE))


class Expert:
    """act(env) -> the next action (target position) for a live PushT env (core.environments.pusht)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.scratch = _Scratch()
        self.contacts = _contacts()
        self.plan: list[tuple[str, np.ndarray]] = []
        self.pose: tuple[np.ndarray, float] | None = None

    def _decide(self, env: Any) -> list[tuple[str, np.ndarray]] | None:
        import shapely.geometry as sg

        position, angle = np.array(env.block.position), env.block.angle
        e0, c0 = outline_error(position, angle), center_error(position, angle)
        agent, block = np.array(env.agent.position), _block_polygon(env)
        depths = (5, 15, 30, 50) if e0 > 20 else (1.5, 3, 6, 10)
        best: tuple[float, np.ndarray, np.ndarray] | None = None
        best_center = best
        for point, normal in self.contacts:
            p = _world(position, angle, point[None])[0]
            n = _rotation(angle) @ normal
            start = p + n * (AGENT_RADIUS + APPROACH)
            if not (LOW < start[0] < HIGH and LOW < start[1] < HIGH):
                continue
            if block.distance(sg.Point(*start)) < AGENT_RADIUS + 4:  # no room for the agent there
                continue
            travel = 0.01 * float(np.linalg.norm(start - agent))
            for depth in depths:
                target = p + n * (AGENT_RADIUS - depth)
                q, a = self.scratch.push(env, start, target)
                e, c = outline_error(q, a) + travel, center_error(q, a) + travel
                if best is None or e < best[0]:
                    best = (e, start, target)
                if best_center is None or c < best_center[0]:
                    best_center = (c, start, target)
        if best is None or best_center is None:
            return None
        if best[0] > e0 - 0.2:
            if best_center[0] > c0 - 0.5:
                return None
            best = best_center
        _, start, target = best
        self.pose = (position, angle)
        return [("go", start)] + [("push", target)] * PUSH_STEPS + [("leave", start)]

    def _wander(self, agent: np.ndarray) -> np.ndarray:
        return np.clip(agent + self.rng.normal(0, 30, 2), LOW, HIGH)

    def act(self, env: Any) -> np.ndarray:
        import shapely.geometry as sg

        agent, block = np.array(env.agent.position), _block_polygon(env)
        for _ in range(4):
            if not self.plan:
                self.plan = self._decide(env) or [("leave", self._wander(agent))]
            kind, where = self.plan[0]
            if kind != "go":
                self.plan.pop(0)
                return where
            assert self.pose is not None
            moved = np.linalg.norm(np.array(env.block.position) - self.pose[0]) > 1.0
            if moved or abs(env.block.angle - self.pose[1]) > 0.01:  # the plan is stale
                self.plan = []
                continue
            here = sg.Point(*agent)
            if block.distance(here) - AGENT_RADIUS < 6:  # too close to travel around it: back away first
                nearest = np.array(block.exterior.interpolate(block.exterior.project(here)).coords[0])
                away = (agent - nearest) / (np.linalg.norm(agent - nearest) + 1e-9)
                return np.clip(agent + away * 20, LOW, HIGH)
            if np.linalg.norm(where - agent) < 3 and np.linalg.norm(np.array(env.agent.velocity)) < 30:
                self.plan.pop(0)
                continue
            path = _route(agent, where, block)
            if path is None:
                self.plan = []
                return self._wander(agent)
            step = path[0] - agent
            length = float(np.linalg.norm(step))
            return path[0] if length <= MAX_STEP else agent + step / length * MAX_STEP
        return agent
