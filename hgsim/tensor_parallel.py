"""Tensor parallelism (TP) over ``n`` GPUs, simulated as one rank on a per-rank view.

Under Megatron-style TP every rank runs the same kernels in lock-step on ``1/n`` of the query
heads, KV heads and FFN columns, and two all-reduces per layer (after the attention output
projection and after the FFN down projection) sum the partial hidden states. The ranks are
identical, so the simulator runs rank 0 only, on

* the model as one rank holds it (``shard_model``): heads, KV heads and FFN width over ``n``
  (KV heads replicated, one per rank, where ``n`` exceeds them, as vLLM does), the vocabulary
  split (vLLM's vocab-parallel embedding and LM head), the hidden size unchanged. Norms are
  replicated, and the model spec counts no norm weights, so a rank's weights are exactly the
  whole model's over ``n``;
* the hardware as one rank sees it (``rank_profile``): rank 0's GPU with its own HBM and its own
  PCIe link, and every host resource divided by the ranks that share it (the fair share of
  identical ranks running in lock-step): a socket's cores, attention rate and in-flight
  capacity, a tier's read and write bandwidth and capacity, a CXL link, by the ranks whose GPU
  hangs off that socket (all ``n`` where none does: every rank then reaches it alike, and all
  ``n`` where option ``host_socket`` puts every rank's host work on the same sockets); a UPI
  link by all ``n``. Cores are floored, at least one. The tiers of another socket whose GPUs
  run ranks too are theirs, not rank 0's (``held_by_other_ranks``);
* all-reduces as operations on the GPU's compute stream (``AllReduce``): they block the layer,
  cost a ring all-reduce over the NVLink between the ranks, or through host memory over PCIe
  where the profile has no NVLink between two neighbours of the ring. Once per decode step
  besides: the vocab-parallel embedding's all-reduce of the new tokens' hidden states before
  the first layer, and the LM head's all-gather of the logits over the whole vocabulary after
  the last.

Data parallelism (``rank_view``'s ``replicas``) runs copies of the TP group side by side,
each on the next ``n`` GPUs: rank 0 then shares the host with every copy's ranks, its
all-reduce stays in its own group, and the system counts every copy.

Results are then for the whole system: throughput is rank 0's (every rank decodes the same
sequences), memory fit is per rank, and energy and cost count the ``n`` GPUs and the host once
(``system_profile``, ``system_activity``). Ranks are the first ``n`` GPUs the profile lists.
GPUs behind one PCIe switch (``pcie_switches``) share its uplink: rank 0's link to the host is
its own link and the uplink over the ranks behind the switch, as one (``host_link``). Left out:
pipeline parallelism, collectives overlapped with compute, peer-to-peer traffic through a
switch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hgsim.errors import UserError, fields_renamed
from hgsim.specs.hardware import HardwareProfile, LinkSpec
from hgsim.specs.model import DTYPE_BYTES, ModelSpec

FIELD = "workload.tensor_parallel"
DP_FIELD = "workload.data_parallel"
NS = 1e-9
GB = 1e9


# ---------------------------------------------------------------------- the model


def check_tensor_parallel(model: ModelSpec, n: int) -> None:
    """A ``UserError`` naming ``workload.tensor_parallel`` where ``n`` cannot shard ``model``:
    it must divide the query heads, and divide the KV heads or be a multiple of them."""
    if n < 1:
        raise UserError(f"must be >= 1, got {n}", field=FIELD)
    if model.num_heads % n:
        raise UserError(f"{n} does not divide the {model.num_heads} attention heads of "
                        f"{model.name}", field=FIELD)
    kv = model.num_kv_heads
    if kv % n and n % kv:
        raise UserError(f"{n} neither divides nor is a multiple of the {kv} KV heads of "
                        f"{model.name}", field=FIELD)


def parallelism_named(tensor_parallel: str, data_parallel: str):
    """A context in which a tensor- or data-parallel error (too many GPUs, a model that does
    not shard) names what asked for it on the caller's surface (a flag, an argument), not the
    workload field a study sets."""
    return fields_renamed({FIELD: tensor_parallel, DP_FIELD: data_parallel})


def shard_model(model: ModelSpec, n: int) -> ModelSpec:
    """What one of ``n`` ranks holds and computes: heads, KV heads (at least one: replicated
    where ``n`` exceeds them) and FFN width over ``n``, the vocabulary split (rounded up), the
    hidden size unchanged. ``n`` = 1: ``model`` itself."""
    check_tensor_parallel(model, n)
    if n == 1:
        return model
    return model.model_copy(update={
        "num_heads": model.num_heads // n,
        "num_kv_heads": max(model.num_kv_heads // n, 1),
        "ffn_size": model.ffn_size // n if model.ffn_size % n == 0
        else math.ceil(model.ffn_size / n),
        "vocab_size": math.ceil(model.vocab_size / n),
    })


def kv_replication(model: ModelSpec, n: int) -> int:
    """How many ranks hold a copy of each KV head (1 unless ``n`` exceeds the KV heads)."""
    return max(n // model.num_kv_heads, 1)


# ---------------------------------------------------------------------- the hardware


def rank_gpus(profile: HardwareProfile, n: int, field: str = FIELD) -> list[str]:
    """The GPUs of the ``n`` ranks: the first ``n`` the profile lists; a ``UserError`` naming
    the profile and ``field`` where it lists fewer."""
    gpus = list(profile.gpus)
    if n > len(gpus):
        raise UserError(f"{n} ranks need {n} GPUs, profile {profile.name} has {len(gpus)} "
                        f"({', '.join(gpus)})", field=field)
    return gpus[:n]


def sharers(profile: HardwareProfile, n: int, host_shared: bool = False) -> dict[str, int]:
    """Ranks sharing each host resource (sockets, tiers, non-GPU links, by name): for what
    belongs to a socket (its cores, its tiers, its CXL links) the ranks whose GPU hangs off that
    socket, or all ``n`` where none does; ``n`` for a UPI link (every rank may cross it). Where
    every rank's host work runs on the same sockets (``host_shared``: policy option
    ``host_socket`` set to a socket or to ``all``) all ``n`` share each."""
    on_socket = ranks_on_socket(profile, n)
    per_socket = {s: n if host_shared else count or n for s, count in on_socket.items()}
    out = dict(per_socket)
    for name, tier in profile.tiers.items():
        out[name] = per_socket[tier.socket]
    gpu_links = {g.link for g in profile.gpus.values()}
    for name, link in profile.links.items():
        if name in gpu_links or link.kind == "nvlink":
            continue
        if link.kind == "upi":
            out[name] = n
        else:  # CXL: the socket it hangs off
            sockets = [e for e in link.endpoints if e in profile.sockets]
            out[name] = max(per_socket[s] for s in sockets) if sockets else n
    return out


def ranks_on_socket(profile: HardwareProfile, n: int) -> dict[str, int]:
    """How many of the ``n`` ranks' GPUs hang off each socket."""
    on_socket: dict[str, int] = dict.fromkeys(profile.sockets, 0)
    for gpu in rank_gpus(profile, n):
        on_socket[profile.gpus[gpu].socket] += 1
    return on_socket


def held_by_other_ranks(profile: HardwareProfile, n: int, host_shared: bool = False
                        ) -> set[str]:
    """Host tiers rank 0 cannot place in: those of another socket whose GPUs run ranks too,
    each working on its own socket (not ``host_shared``). Those ranks place the same bytes as
    rank 0, nearest their own socket first, so by the time rank 0's share would spill there
    they have taken that tier as rank 0 has taken its own: a remote tier's capacity, divided
    among its own ranks, is not rank 0's to count as well (which would double what a rank can
    hold once KV spills across sockets). Where the sockets host unequal numbers of ranks this
    is conservative (the less loaded socket's ranks may leave room). A socket without ranks
    is everyone's: its tiers stay, shared by all ``n`` (``sharers``)."""
    if host_shared or n == 1:
        return set()
    home = profile.gpus[rank_gpus(profile, n)[0]].socket
    on_socket = ranks_on_socket(profile, n)
    return {name for name, tier in profile.tiers.items()
            if tier.socket != home and on_socket[tier.socket] > 0}


def behind_switches(profile: HardwareProfile, n: int) -> dict[str, int]:
    """How many of the ``n`` ranks' GPUs sit behind each PCIe switch (a switch none of them
    uses is left out)."""
    out: dict[str, int] = {}
    for gpu in rank_gpus(profile, n):
        switch = profile.gpus[gpu].pcie_switch
        if switch is not None:
            out[switch] = out.get(switch, 0) + 1
    return out


def host_link(profile: HardwareProfile, gpu: str, sharing: int = 1) -> LinkSpec:
    """GPU ``gpu``'s way to its root complex as one PCIe link: its own link, and where it
    sits behind a switch, the switch's uplink shared by ``sharing`` GPUs copying at once
    (identical ranks copy in lock-step): bandwidth the lesser of the two, latency the link's
    plus one traversal of the switch."""
    spec = profile.gpus[gpu]
    link = profile.links[spec.link]
    if spec.pcie_switch is None:
        return link
    switch = profile.pcie_switches[spec.pcie_switch]
    return link.model_copy(update={
        "bandwidth_gbps": min(link.bandwidth_gbps, switch.uplink_bandwidth_gbps / sharing),
        "latency_ns": link.latency_ns + switch.latency_ns})


def rank_profile(profile: HardwareProfile, n: int, host_shared: bool = False
                 ) -> HardwareProfile:
    """The hardware as rank 0 of ``n`` sees it: its GPU alone (with its own HBM and PCIe link,
    no NVLink: collectives are ``AllReduce``'s), every shared host resource divided by its
    sharers (``sharers``), without the tiers other ranks hold (``held_by_other_ranks``) and
    their links; a PCIe switch folded into the GPU's link (``host_link``). A one-GPU profile
    at ``n`` = 1 with no switch is returned unchanged."""
    gpus = rank_gpus(profile, n)
    gpu = gpus[0]
    switch = profile.gpus[gpu].pcie_switch
    if n == 1 and len(profile.gpus) == 1 and switch is None:
        return profile
    share = sharers(profile, n, host_shared)
    held = held_by_other_ranks(profile, n, host_shared)
    sockets = {
        name: s.model_copy(update={"cores": max(s.cores // share[name], 1)})
        if share[name] > 1 else s
        for name, s in profile.sockets.items()}
    tiers = {
        name: t.model_copy(update={
            "capacity_gb": t.capacity_gb / share[name],
            "read_bandwidth_gbps": t.read_bandwidth_gbps / share[name],
            "write_bandwidth_gbps": t.write_bandwidth_gbps / share[name]})
        if share[name] > 1 else t
        for name, t in profile.tiers.items() if name not in held}
    own = profile.gpus[gpu].link
    # behind a switch the GPU's link and the switch's uplink act as one link, named for both
    # (what binds then says "pcie0 via sw0 h2d")
    own_name = own if switch is None else f"{own} via {switch}"
    links = {}
    for name, link in profile.links.items():
        if set(link.endpoints) & held:
            continue
        if name == own:
            links[own_name] = host_link(profile, gpu, behind_switches(profile, n).get(switch, 1))
        elif name in share:
            links[name] = (link.model_copy(update={
                "bandwidth_gbps": link.bandwidth_gbps / share[name]})
                if share[name] > 1 else link)
    alone = profile.gpus[gpu].model_copy(update={"pcie_switch": None, "link": own_name})
    return profile.model_copy(update={"gpus": {gpu: alone}, "sockets": sockets, "tiers": tiers,
                                      "links": links, "pcie_switches": {}})


def system_profile(profile: HardwareProfile, n: int) -> HardwareProfile:
    """The machine that energy and cost count: the ``n`` ranks' GPUs (the profile's others
    serve other work), their PCIe links and the NVLinks between them, and the whole host once.
    A one-GPU profile is returned unchanged."""
    gpus = rank_gpus(profile, n)
    if len(profile.gpus) == n:
        return profile
    others = set(profile.gpus) - set(gpus)
    links = {name: link for name, link in profile.links.items()
             if not set(link.endpoints) & others}
    return profile.model_copy(update={"gpus": {g: profile.gpus[g] for g in gpus},
                                      "links": links})


def socket_mirror(profile: HardwareProfile, home: str, other: str) -> dict[str, str]:
    """The host resources of socket ``home`` and socket ``other`` swapped, by name: the sockets
    themselves, their tiers of each kind (in the profile's order) and the links between
    corresponding ends (a socket's CXL link onto the other's). A rank on ``other`` uses the
    host as rank 0 (on ``home``) does, seen through this swap, which holds where the two
    sockets are alike (a name without a counterpart maps to itself). Empty when they are the
    same socket."""
    if home == other:
        return {}
    mirror = {home: other, other: home}
    for kind in ("ddr", "cxl", "hbm"):
        ours = [t for t, spec in profile.tiers.items() if spec.socket == home and spec.kind == kind]
        theirs = [t for t, spec in profile.tiers.items()
                  if spec.socket == other and spec.kind == kind]
        for a, b in zip(ours, theirs, strict=False):
            mirror[a], mirror[b] = b, a
    by_ends = {(link.kind, frozenset(link.endpoints)): name for name, link in profile.links.items()}
    for name, link in profile.links.items():
        ends = frozenset(mirror.get(e, e) for e in link.endpoints)
        twin = by_ends.get((link.kind, ends))
        if twin is not None and twin != name:
            mirror[name] = twin
    return mirror


# ---------------------------------------------------------------------- the all-reduce


def ring_allreduce_s(n: int, bytes_: float, bandwidth_Bps: float, hop_latency_s: float) -> float:
    """A ring all-reduce of ``bytes_`` over ``n`` ranks: a reduce-scatter and an all-gather,
    ``n-1`` steps each, every step sending ``bytes_/n`` to the next rank:
    ``2(n-1) x hop latency + 2(n-1)/n x bytes / bandwidth``. 0 for one rank."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * hop_latency_s + 2 * (n - 1) / n * bytes_ / bandwidth_Bps


def ring_allgather_s(n: int, bytes_: float, bandwidth_Bps: float, hop_latency_s: float) -> float:
    """A ring all-gather assembling ``bytes_`` from ``n`` ranks' equal parts: ``n-1`` steps,
    each sending ``bytes_/n`` to the next rank: ``(n-1) x hop latency + (n-1)/n x bytes /
    bandwidth``. 0 for one rank."""
    if n <= 1:
        return 0.0
    return (n - 1) * hop_latency_s + (n - 1) / n * bytes_ / bandwidth_Bps


def logits_bytes(batch: int, vocab: int, activation_dtype: str) -> float:
    """Bytes of one step's logits over the whole vocabulary (what the vocab-parallel LM head's
    gather assembles)."""
    return float(batch * vocab * DTYPE_BYTES[activation_dtype])


def allreduce_bytes(batch: int, tokens: int, hidden: int, activation_dtype: str) -> float:
    """Bytes one all-reduce sums: every sequence's hidden state for ``tokens`` positions."""
    return float(batch * tokens * hidden * DTYPE_BYTES[activation_dtype])


@dataclass(frozen=True)
class AllReduce:
    """The ring all-reduce of ``ranks`` ranks: its slowest hop's bandwidth (per direction) and
    the largest hop latency; ``via`` ``nvlink`` or ``pcie`` (through host memory); ``links``:
    the profile links a rank's share crosses (energy), ``label``: what binds on the critical
    path."""

    ranks: int
    bandwidth_Bps: float
    hop_latency_s: float
    via: str
    links: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        return f"{self.via} all-reduce"

    def time_s(self, bytes_: float) -> float:
        return ring_allreduce_s(self.ranks, bytes_, self.bandwidth_Bps, self.hop_latency_s)

    def sent_bytes(self, bytes_: float) -> float:
        """What one rank sends (and receives) in one all-reduce: ``2(n-1)/n x bytes``."""
        return 2 * (self.ranks - 1) / self.ranks * bytes_ if self.ranks > 1 else 0.0

    def gather_time_s(self, bytes_: float) -> float:
        """A ring all-gather whose result is ``bytes_`` (each rank holding ``bytes_/n``):
        ``(n-1) x hop latency + (n-1)/n x bytes / bandwidth``, half an all-reduce."""
        return ring_allgather_s(self.ranks, bytes_, self.bandwidth_Bps, self.hop_latency_s)

    def gather_sent_bytes(self, bytes_: float) -> float:
        """What one rank sends (and receives) in one all-gather: ``(n-1)/n x bytes``."""
        return (self.ranks - 1) / self.ranks * bytes_ if self.ranks > 1 else 0.0


def _nvlink(profile: HardwareProfile, a: str, b: str) -> str | None:
    for name, link in profile.links.items():
        if link.kind == "nvlink" and set(link.endpoints) == {a, b}:
            return name
    return None


def _host_hop(profile: HardwareProfile, a: str, b: str, n: int,
              share: dict[str, int]) -> tuple[float, float, list[str]]:
    """Bandwidth, latency and links of one ring step through host memory: GPU ``a`` writes
    its share to host DRAM of its socket over its PCIe link, GPU ``b`` reads it over its own
    (each through its switch, if any, shared by the ranks behind it: ``host_link``; crossing
    UPI where their sockets differ); the staging DRAM's write and read bandwidth
    shared by the ranks on its socket. The latency is the route's (links and DRAM), without
    the collective library's own overhead: a lower bound."""
    ga, gb = profile.gpus[a], profile.gpus[b]
    behind = behind_switches(profile, n)
    la = host_link(profile, a, behind.get(ga.pcie_switch, 1))
    lb = host_link(profile, b, behind.get(gb.pcie_switch, 1))
    ddr = [t for t, spec in profile.tiers.items()
           if spec.kind == "ddr" and spec.socket == ga.socket] or list(profile.tiers)
    tier = profile.tiers[ddr[0]]
    rates = [la.bandwidth_gbps, lb.bandwidth_gbps,
             tier.write_bandwidth_gbps / share[ddr[0]], tier.read_bandwidth_gbps / share[ddr[0]]]
    latency = la.latency_ns + lb.latency_ns + tier.latency_ns
    links = [ga.link, gb.link]
    if ga.socket != gb.socket:
        upi = [name for name, link in profile.links.items()
               if link.kind == "upi" and set(link.endpoints) == {ga.socket, gb.socket}]
        if upi:
            rates.append(profile.links[upi[0]].bandwidth_gbps / n)
            latency += profile.links[upi[0]].latency_ns
            links.append(upi[0])
    return min(rates) * GB, latency * NS, links


def ring_allreduce(profile: HardwareProfile, n: int, ranks: int | None = None
                   ) -> AllReduce | None:
    """The all-reduce of the first ``n`` GPUs in a ring in the profile's order (None for one
    rank): over NVLink where every neighbour pair has one (the slowest pair's bandwidth and
    latency), else through host memory over PCIe (``_host_hop``, the host's DRAM and UPI
    shared by all ``ranks`` in use, ``n`` unless replicas add more)."""
    gpus = rank_gpus(profile, n)
    if n == 1:
        return None
    pairs = [(gpus[i], gpus[(i + 1) % n]) for i in range(n)]
    nvlinks = [_nvlink(profile, a, b) for a, b in pairs]
    if all(nvlinks):
        specs = [profile.links[name] for name in nvlinks]
        # rank 0 sends to rank 1 and receives from rank n-1
        return AllReduce(n, min(s.bandwidth_gbps for s in specs) * GB,
                         max(s.latency_ns for s in specs) * NS, "nvlink",
                         tuple(dict.fromkeys((nvlinks[0], nvlinks[-1]))))
    ranks = ranks or n
    share = sharers(profile, ranks)
    hops = [_host_hop(profile, a, b, ranks, share) for a, b in pairs]
    return AllReduce(n, min(h[0] for h in hops), max(h[1] for h in hops), "pcie",
                     tuple(hops[0][2]))


# ---------------------------------------------------------------------- together


@dataclass(frozen=True)
class RankView:
    """What the simulator runs for ``n``-way TP, ``replicas`` times over (data parallelism):
    rank 0's model and hardware, its all-reduce (None for one rank) and the system that energy
    and cost count (every replica's ranks)."""

    n: int
    model: ModelSpec
    profile: HardwareProfile
    allreduce: AllReduce | None
    system: HardwareProfile
    replicas: int = 1

    @property
    def ranks(self) -> int:
        """GPUs in use: ``n`` per replica."""
        return self.n * self.replicas


def check_data_parallel(profile: HardwareProfile, n: int, replicas: int) -> None:
    """A ``UserError`` naming ``workload.data_parallel`` where ``replicas`` copies of an
    ``n``-way TP model need more GPUs than ``profile`` lists (or ``replicas`` < 1)."""
    if replicas < 1:
        raise UserError(f"must be >= 1, got {replicas}", field=DP_FIELD)
    gpus = len(profile.gpus)
    if n * replicas > gpus and replicas > 1:
        raise UserError(f"{replicas} replicas x tensor_parallel {n} need {n * replicas} GPUs, "
                        f"profile {profile.name} has {gpus} ({', '.join(profile.gpus)})",
                        field=DP_FIELD)


def placed_profile(profile: HardwareProfile, n: int, replicas: int = 1,
                   placement: str = "packed") -> HardwareProfile:
    """``profile`` with its GPUs listed in rank order, as ``placement`` puts ``replicas``
    copies of an ``n``-GPU group on them: ``packed``, the profile's own order (copies fill one
    socket's GPUs before the next's); ``spread``, each copy's ``n`` GPUs from the next socket
    in turn that still has ``n`` free (sockets in the order their first GPU is listed, GPUs in
    the profile's order within a socket: two copies on a two-socket host, one per socket), then
    whatever is left as listed. ``profile`` itself where the order does not change."""
    if placement == "packed" or replicas == 1:
        return profile
    free: dict[str, list[str]] = {}
    for gpu, spec in profile.gpus.items():
        free.setdefault(spec.socket, []).append(gpu)
    order: list[str] = []
    while True:
        took = False
        for socket in free:
            if len(free[socket]) >= n:
                order += free[socket][:n]
                del free[socket][:n]
                took = True
        if not took:
            break
    order += [g for g in profile.gpus if g not in order]
    if order == list(profile.gpus):
        return profile
    return profile.model_copy(update={"gpus": {g: profile.gpus[g] for g in order}})


def rank_view(profile: HardwareProfile, model: ModelSpec, n: int,
              host_shared: bool = False, replicas: int = 1,
              placement: str = "packed") -> RankView:
    """``n``-way TP of ``model`` on ``profile`` as rank 0 runs it (``n`` = 1 on a one-GPU
    profile: the model and profile unchanged); ``host_shared``: every rank's host work on the
    same sockets (``sharers``); ``replicas``: that many copies of the model (data
    parallelism), each on the next ``n`` GPUs in the order ``placement`` gives
    (``placed_profile``), decoding their own sequences, all sharing the host: rank 0 sees the
    host divided among ``n x replicas`` ranks, its all-reduce stays within its own replica's
    ``n`` GPUs."""
    check_tensor_parallel(model, n)
    check_data_parallel(profile, n, replicas)
    profile = placed_profile(profile, n, replicas, placement)
    ranks = n * replicas
    return RankView(n, shard_model(model, n), rank_profile(profile, ranks, host_shared),
                    ring_allreduce(profile, n, ranks), system_profile(profile, ranks),
                    replicas)
