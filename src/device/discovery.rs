//! Finding adapters: each physical GPU once, in bus order, Vulkan/Metal/DX12 before GL, CPU
//! adapters only when asked for or when there is no GPU.
//!
//! The choice itself is [`select`], a pure function over [`AdapterInfo`]s, so that it can be
//! tested on synthetic lists (an 8-GPU node, a GPU seen through two backends) on a machine that
//! has none of them; [`discover_adapters`] only enumerates and maps the choice back.

use std::sync::atomic::{AtomicU64, Ordering};

use wgpu::{Adapter, AdapterInfo, Backend, Backends, DeviceType, Instance};

use crate::error::{Error, Result};

/// Which adapters a communicator may use.
///
/// By default every Vulkan, Metal and DX12 GPU, each physical GPU once (the same GPU seen through
/// two backends is one), ordered by PCI bus id where the driver reports it; GL only when none of
/// those backends has an eligible adapter. CPU adapters (llvmpipe/lavapipe, WARP) never join GPU
/// ranks: they are taken only when there is no GPU, when [`cpu`](Self::cpu) asks for them, or when
/// a name filter matches nothing else.
///
/// wgpu's environment variables are honoured when the selector leaves the choice open:
/// `WGPU_BACKEND` (for example `vulkan` or `gl`) picks the backends, `WGPU_ADAPTER_NAME` a name
/// substring.
///
/// ```
/// use wccl::AdapterSelector;
/// let sel = AdapterSelector::default().name("llvmpipe").backends(wgpu::Backends::VULKAN);
/// assert_eq!(sel.name_filter(), Some("llvmpipe"));
/// // One process per GPU: this process takes the host's GPU number LOCAL_RANK.
/// let local: usize = std::env::var("LOCAL_RANK").ok().and_then(|r| r.parse().ok()).unwrap_or(0);
/// let sel = AdapterSelector::default().local(local);
/// assert_eq!(sel.local_index(), Some(local));
/// ```
#[derive(Clone, Debug, Default)]
pub struct AdapterSelector {
    backends: Option<Backends>,
    name: Option<String>,
    local: Option<usize>,
    cpu: bool,
}

impl AdapterSelector {
    /// Keep only adapters whose name contains `name` (case-insensitive).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Keep only these backends (asking for GL here makes GL adapters eligible).
    pub fn backends(mut self, backends: Backends) -> Self {
        self.backends = Some(backends);
        self
    }

    /// Only the `i`-th adapter of the host (counting from 0, in the order discovery lists them:
    /// by PCI bus id where the driver reports it), for launchers that start one process per GPU
    /// and hand each its `LOCAL_RANK`. Discovery fails when the host has `i` adapters or fewer.
    pub fn local(mut self, i: usize) -> Self {
        self.local = Some(i);
        self
    }

    /// Only CPU adapters (llvmpipe/lavapipe, WARP), even where GPUs exist: for testing on a GPU
    /// machine without its GPUs.
    pub fn cpu(mut self) -> Self {
        self.cpu = true;
        self
    }

    /// The name filter set on this selector, if any. When none is set, discovery falls back to
    /// `WGPU_ADAPTER_NAME`; this method does not read the environment.
    pub fn name_filter(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The host adapter index set by [`local`](Self::local), if any.
    pub fn local_index(&self) -> Option<usize> {
        self.local
    }

    /// The selector with the environment's defaults filled in.
    fn wanted(&self) -> Wanted {
        Wanted::resolve(
            self,
            std::env::var("WGPU_ADAPTER_NAME").ok(),
            Backends::from_env(),
        )
    }
}

/// What a selector asks for once wgpu's environment variables are applied.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Wanted {
    /// Eligible backends.
    backends: Backends,
    /// Whether the backends were named (by the selector or `WGPU_BACKEND`): then every named
    /// backend is eligible at once, GL included.
    explicit: bool,
    /// Lower-case name substring.
    name: Option<String>,
    local: Option<usize>,
    cpu: bool,
}

impl Wanted {
    /// The selector's own settings, else the environment's (`env_name` is `WGPU_ADAPTER_NAME`,
    /// `env_backends` is `WGPU_BACKEND` parsed).
    pub(crate) fn resolve(
        sel: &AdapterSelector,
        env_name: Option<String>,
        env_backends: Option<Backends>,
    ) -> Wanted {
        let (backends, explicit) = match sel.backends.or(env_backends) {
            Some(b) => (b, true),
            None => (Backends::all(), false),
        };
        let name = sel
            .name
            .clone()
            .or(env_name)
            .filter(|n| !n.is_empty())
            .map(|n| n.to_lowercase());
        Wanted {
            backends,
            explicit,
            name,
            local: sel.local,
            cpu: sel.cpu,
        }
    }

    /// The backend sets to enumerate, in order: the next one only when the ones before it gave
    /// nothing eligible (GL is slow to probe and rarely wanted).
    fn passes(&self) -> Vec<Backends> {
        if self.explicit {
            vec![self.backends]
        } else {
            [Backends::PRIMARY, Backends::GL]
                .into_iter()
                .map(|p| p & self.backends)
                .filter(|p| !p.is_empty())
                .collect()
        }
    }

    fn describe(&self) -> String {
        let mut s = if self.explicit {
            format!("backends {:?}", self.backends)
        } else {
            "backends Vulkan/Metal/DX12, else GL".to_string()
        };
        if let Some(n) = &self.name {
            s.push_str(&format!(" and name containing '{n}'"));
        }
        if self.cpu {
            s.push_str(", CPU adapters only");
        }
        if let Some(i) = self.local {
            s.push_str(&format!(", local adapter {i}"));
        }
        s
    }
}

/// The outcome of [`select`].
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Selection {
    /// Indices into the list, in rank order.
    pub(crate) picked: Vec<usize>,
    /// How many distinct adapters were eligible before [`AdapterSelector::local`] picked one.
    pub(crate) eligible: usize,
}

/// Chooses from `infos` (indices into it, in rank order): the eligible backends and names; GPUs,
/// or CPU adapters only when no GPU is eligible (or when asked for); without named backends, the
/// primary backends and GL only when they have nothing; each physical adapter once, through its
/// best backend; ordered by backend then bus id then listing order; then the `local` one.
pub(crate) fn select(infos: &[AdapterInfo], want: &Wanted) -> Selection {
    let eligible = |i: &AdapterInfo, pass: Backends| {
        pass.contains(Backends::from(i.backend))
            && want
                .name
                .as_ref()
                .is_none_or(|n| i.name.to_lowercase().contains(n))
    };
    let mut chosen = Vec::new();
    for pass in want.passes() {
        let found: Vec<usize> = (0..infos.len())
            .filter(|&k| eligible(&infos[k], pass))
            .collect();
        let is_cpu = |k: &usize| infos[*k].device_type == DeviceType::Cpu;
        // A CPU adapter would be the slowest rank of every collective: never next to a GPU.
        let any_gpu = found.iter().any(|k| !is_cpu(k));
        let keep_cpu = want.cpu || !any_gpu;
        chosen = found
            .into_iter()
            .filter(|k| is_cpu(k) == keep_cpu)
            .collect();
        if !chosen.is_empty() {
            break;
        }
    }
    chosen.sort_by(|&a, &b| order_key(&infos[a], a).cmp(&order_key(&infos[b], b)));
    // Each physical adapter once: through the first (best) backend that lists it. `absorbed`
    // records which other backend's adapter each kept one has already stood for, so that eight
    // identical GPUs without bus ids seen through two backends stay eight.
    let mut kept: Vec<usize> = Vec::new();
    let mut absorbed: Vec<(usize, Backend)> = Vec::new();
    for k in chosen {
        let c = &infos[k];
        let twin = kept.iter().copied().find(|&j| {
            let p = &infos[j];
            match same_physical(p, c) {
                Some(same) => same,
                None => {
                    p.backend != c.backend
                        && looks_alike(p, c)
                        && !absorbed.contains(&(j, c.backend))
                }
            }
        });
        match twin {
            Some(j) => absorbed.push((j, c.backend)),
            None => kept.push(k),
        }
    }
    let eligible = kept.len();
    let picked = match want.local {
        Some(i) => kept.get(i).map(|&k| vec![k]).unwrap_or_default(),
        None => kept,
    };
    Selection { picked, eligible }
}

/// Best backend first; then adapters with a bus id, in bus order (the form is fixed-width hex,
/// so string order is bus order); then the driver's listing order.
fn order_key(i: &AdapterInfo, index: usize) -> (u8, bool, String, usize) {
    (
        backend_rank(i.backend),
        i.device_pci_bus_id.is_empty(),
        i.device_pci_bus_id.clone(),
        index,
    )
}

/// Whether two adapters are the same physical device, where the drivers say: both report a PCI
/// bus id (equal or not), or both come from the same backend (a backend lists each device once).
/// `None` when only a guess is possible.
pub(crate) fn same_physical(a: &AdapterInfo, b: &AdapterInfo) -> Option<bool> {
    if !a.device_pci_bus_id.is_empty() && !b.device_pci_bus_id.is_empty() {
        Some(a.device_pci_bus_id == b.device_pci_bus_id)
    } else if a.backend == b.backend {
        Some(false)
    } else {
        None
    }
}

/// The guess for two backends without bus ids: the same name, or the same vendor and device id
/// where a backend that reports no device id (GL: 0) matches any. `select` lets each adapter
/// stand for at most one of every other backend, so the count of devices stays right even where
/// the guess pairs two models of one vendor the wrong way round.
fn looks_alike(a: &AdapterInfo, b: &AdapterInfo) -> bool {
    let same_device = a.device == b.device || a.device == 0 || b.device == 0;
    (a.vendor != 0 && a.vendor == b.vendor && same_device) || a.name == b.name
}

/// Lists the adapters a selector admits on `instance`, each physical adapter once, in rank
/// order (see [`AdapterSelector`]). An `instance` made with `InstanceFlags::DEBUG` (wgpu's
/// default in debug builds) can crash the process on Vulkan while other threads make or drop
/// groups: see the crate's README, "`WGPU_DEBUG`".
pub fn discover_adapters(instance: &Instance, selector: &AdapterSelector) -> Result<Vec<Adapter>> {
    discover_with(
        &selector.wanted(),
        |pass| pollster::block_on(instance.enumerate_adapters(pass)),
        Adapter::get_info,
    )
}

/// Like [`discover_adapters`], on instances of its own that enable only the backends being
/// enumerated: GL's (EGL's) set-up is skipped unless GL is asked for or nothing else exists.
pub fn discover(selector: &AdapterSelector) -> Result<Vec<Adapter>> {
    discover_with(
        &selector.wanted(),
        |pass| {
            // Making an instance and enumerating its devices, one thread at a time in the
            // process, as making and destroying devices is (see `lifecycle`).
            let _turn = super::lifecycle::turn();
            let instance = instance_for(pass);
            pollster::block_on(instance.enumerate_adapters(pass))
        },
        Adapter::get_info,
    )
}

/// The process's instance for `pass`, made once and kept for the life of the process.
///
/// Dropping the last instance lets the Vulkan loader unload the driver; NVIDIA's driver (580 on
/// an H200) then crashes the process, jumping into its own unloaded code from a thread of its
/// own that still runs, after about a hundred groups were built and dropped in one process (the
/// kill tests do that). One instance per set of backends keeps the driver loaded; devices are
/// still made and dropped per group.
///
/// Not for GL: wgpu's GL adapters share one EGL context per instance, and groups on threads of
/// their own (tests run in parallel) then fail to make it current (`BadAccess`); a GL pass gets
/// an instance of its own, as before.
fn instance_for(pass: Backends) -> Instance {
    let desc = instance_desc(pass, std::env::var("WGPU_DEBUG").is_ok());
    if pass.intersects(Backends::GL) {
        return Instance::new(desc);
    }
    static INSTANCES: std::sync::OnceLock<std::sync::Mutex<Vec<(Backends, Instance)>>> =
        std::sync::OnceLock::new();
    let cache = INSTANCES.get_or_init(Default::default);
    let mut cache = cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, i)) = cache.iter().find(|(b, _)| *b == pass) {
        return i.clone();
    }
    let instance = Instance::new(desc);
    cache.push((pass, instance.clone()));
    instance
}

/// The descriptor of wccl's instance for `pass`: wgpu's settings from the environment, but
/// without `InstanceFlags::DEBUG` unless `WGPU_DEBUG` was set (`debug_set`: then wgpu's own
/// reading of it stands), GL's too, for one rule.
///
/// Why: wgpu sets `DEBUG` by default in debug builds (release builds have it off), and with it
/// enables `VK_EXT_debug_utils`: it names every object it makes
/// (`vkSetDebugUtilsObjectNameEXT`) and labels command buffers. For each of those calls the
/// Vulkan loader (1.3.239 here) looks the device up in its lists of every device of every
/// instance in the process, without a lock, while other threads make and drop devices and
/// instances (tests run in parallel, and a process may hold several jobs). Taking a
/// [`lifecycle`](super::lifecycle) turn around making and dropping devices does not cover it:
/// names and labels come with every buffer made and every call encoded, outside any turn. It
/// crashed the process twice in this repository's test runs (SIGSEGV in libvulkan, reading
/// `ICD_LOADER_MAGIC` as an address; wgpu issue #5270). Without `DEBUG` the debug messenger goes
/// too (validation layers' messages, where `VALIDATION` finds one, no longer reach wgpu's log)
/// and shaders carry no debug info.
///
/// An instance of the caller's own with `DEBUG` in the same process (for
/// [`discover_adapters`] or [`CommGroup::from_devices`](crate::CommGroup::from_devices)) can
/// still race wccl's groups.
fn instance_desc(pass: Backends, debug_set: bool) -> wgpu::InstanceDescriptor {
    let mut desc = wgpu::InstanceDescriptor {
        backends: pass,
        ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
    };
    if !debug_set {
        desc.flags.remove(wgpu::InstanceFlags::DEBUG);
    }
    desc
}

/// Enumerates pass by pass (see [`Wanted::passes`]) until one gives something eligible, then
/// selects. Generic over the adapter type so that tests can count the passes without adapters.
fn discover_with<A>(
    want: &Wanted,
    mut enumerate: impl FnMut(Backends) -> Vec<A>,
    info: impl Fn(&A) -> AdapterInfo,
) -> Result<Vec<A>> {
    let mut all: Vec<A> = Vec::new();
    let mut infos: Vec<AdapterInfo> = Vec::new();
    let mut selection = Selection {
        picked: Vec::new(),
        eligible: 0,
    };
    for pass in want.passes() {
        let more = enumerate(pass);
        infos.extend(more.iter().map(&info));
        all.extend(more);
        selection = select(&infos, want);
        if selection.eligible > 0 {
            break;
        }
    }
    if selection.picked.is_empty() {
        let mut wanted = want.describe();
        if want.local.is_some() {
            wanted.push_str(&format!(" (the host has {})", selection.eligible));
        }
        let found = if infos.is_empty() {
            "none (is a Vulkan driver installed? on Debian: apt-get install -y mesa-vulkan-drivers)"
                .to_string()
        } else {
            infos
                .iter()
                .map(describe_one)
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(Error::NoAdapter { wanted, found });
    }
    let mut slots: Vec<Option<A>> = all.into_iter().map(Some).collect();
    Ok(selection
        .picked
        .iter()
        .filter_map(|&k| slots.get_mut(k).and_then(Option::take))
        .collect())
}

/// A number for "this adapter object", unique in the process: ranks opened on the same one share
/// a physical device even where the driver reports no bus id.
pub(crate) fn next_adapter_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn backend_rank(b: Backend) -> u8 {
    match b {
        Backend::Vulkan | Backend::Metal | Backend::Dx12 => 0,
        Backend::Gl => 2,
        _ => 1,
    }
}

fn describe_one(i: &AdapterInfo) -> String {
    if i.device_pci_bus_id.is_empty() {
        format!("'{}' ({:?}, {:?})", i.name, i.backend, i.device_type)
    } else {
        format!(
            "'{}' ({:?}, {:?}, bus {})",
            i.name, i.backend, i.device_type, i.device_pci_bus_id
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wccl's instances, Vulkan's and GL's, leave `DEBUG` out unless `WGPU_DEBUG` was set;
    /// set, wgpu's reading of it stands (as the environment has it here: CI sets neither).
    #[test]
    fn instances_name_no_objects_unless_asked() {
        use wgpu::InstanceFlags as F;
        let from_env = wgpu::InstanceDescriptor::new_without_display_handle_from_env().flags;
        for pass in [Backends::VULKAN, Backends::PRIMARY, Backends::GL] {
            let desc = instance_desc(pass, false);
            assert!(!desc.flags.contains(F::DEBUG), "{pass:?}");
            assert_eq!(desc.flags, from_env.difference(F::DEBUG), "{pass:?}");
            assert_eq!(desc.backends, pass);
            assert_eq!(instance_desc(pass, true).flags, from_env, "{pass:?}");
        }
    }

    fn adapter(name: &str, ty: DeviceType, backend: Backend, bus: &str) -> AdapterInfo {
        let mut i = AdapterInfo::new(ty, backend);
        i.name = name.into();
        (i.vendor, i.device) = if ty == DeviceType::Cpu {
            (0x10005, 0)
        } else {
            (0x10de, 0x2330)
        };
        i.device_pci_bus_id = bus.into();
        i
    }

    fn gpu(backend: Backend, bus: &str) -> AdapterInfo {
        adapter(
            "NVIDIA H100 80GB HBM3",
            DeviceType::DiscreteGpu,
            backend,
            bus,
        )
    }

    fn llvmpipe(backend: Backend) -> AdapterInfo {
        adapter(
            "llvmpipe (LLVM 15.0.6, 256 bits)",
            DeviceType::Cpu,
            backend,
            "",
        )
    }

    fn pick(infos: &[AdapterInfo], sel: &AdapterSelector) -> Vec<usize> {
        select(infos, &Wanted::resolve(sel, None, None)).picked
    }

    fn bus(k: usize) -> String {
        format!("0000:{:02x}:00.0", 0x18 + 0x11 * k)
    }

    #[test]
    fn eight_identical_gpus_are_eight_ranks_in_bus_order() {
        // Listed out of bus order, as drivers may; the same name and ids on every one.
        let order = [5, 2, 7, 0, 3, 6, 1, 4];
        let infos: Vec<_> = order
            .iter()
            .map(|&k| gpu(Backend::Vulkan, &bus(k)))
            .collect();
        let got = pick(&infos, &AdapterSelector::default());
        assert_eq!(got.len(), 8, "{got:?}");
        let buses: Vec<_> = got
            .iter()
            .map(|&k| infos[k].device_pci_bus_id.clone())
            .collect();
        assert_eq!(buses, (0..8).map(bus).collect::<Vec<_>>());
        // local(i) is the i-th of that order, and one adapter only.
        for i in 0..8 {
            let one = pick(&infos, &AdapterSelector::default().local(i));
            assert_eq!(one.len(), 1);
            assert_eq!(infos[one[0]].device_pci_bus_id, bus(i));
        }
        let past = select(
            &infos,
            &Wanted::resolve(&AdapterSelector::default().local(8), None, None),
        );
        assert_eq!((past.picked.len(), past.eligible), (0, 8));
    }

    #[test]
    fn identical_gpus_without_bus_ids_are_never_merged_within_a_backend() {
        let infos: Vec<_> = (0..8).map(|_| gpu(Backend::Vulkan, "")).collect();
        assert_eq!(
            pick(&infos, &AdapterSelector::default()),
            (0..8).collect::<Vec<_>>()
        );
        // The same eight through DX12 too (named backends, no bus ids): still eight, each
        // through Vulkan.
        let mut both = infos.clone();
        both.extend((0..8).map(|_| gpu(Backend::Dx12, "")));
        let sel = AdapterSelector::default().backends(Backends::VULKAN | Backends::DX12);
        let got = pick(&both, &sel);
        assert_eq!(got.len(), 8, "{got:?}");
        assert!(got.iter().all(|&k| both[k].backend == Backend::Vulkan));
    }

    #[test]
    fn one_gpu_through_vulkan_and_gl_is_one_rank() {
        // GL listed first; both backends asked for, both with the bus id.
        let infos = [gpu(Backend::Gl, &bus(1)), gpu(Backend::Vulkan, &bus(1))];
        let sel = AdapterSelector::default().backends(Backends::VULKAN | Backends::GL);
        assert_eq!(pick(&infos, &sel), vec![1]);
        // GL as it reports itself: no bus id, no device id, the renderer string as the name.
        let mut gl = gpu(Backend::Gl, "");
        (gl.name, gl.device) = ("NVIDIA H100 80GB HBM3/PCIe/SSE2".into(), 0);
        let infos = [gl.clone(), gpu(Backend::Vulkan, &bus(1))];
        assert_eq!(pick(&infos, &sel), vec![1]);
        // Two of them through both backends: two.
        let infos = [
            gl.clone(),
            gl.clone(),
            gpu(Backend::Vulkan, &bus(1)),
            gpu(Backend::Vulkan, &bus(0)),
        ];
        assert_eq!(pick(&infos, &sel), vec![3, 2]);
        // GL lists two alike GPUs, Vulkan only one of them: the other is a second device.
        let infos = [gpu(Backend::Vulkan, ""), gl.clone(), gl.clone()];
        assert_eq!(pick(&infos, &sel), vec![0, 2]);
        let infos = [
            gl.clone(),
            gl,
            gpu(Backend::Vulkan, &bus(1)),
            gpu(Backend::Vulkan, &bus(0)),
        ];
        // By default GL is not even eligible beside a Vulkan GPU.
        assert_eq!(pick(&infos, &AdapterSelector::default()), vec![3, 2]);
        assert_eq!(pick(&infos[..1], &AdapterSelector::default()), vec![0]);
        // Two GPUs with distinct bus ids through two backends stay two.
        let infos = [gpu(Backend::Gl, &bus(2)), gpu(Backend::Vulkan, &bus(1))];
        assert_eq!(pick(&infos, &sel), vec![1, 0]);
    }

    #[test]
    fn cpu_adapters_do_not_join_gpus() {
        let infos = [
            llvmpipe(Backend::Vulkan),
            gpu(Backend::Vulkan, &bus(3)),
            gpu(Backend::Vulkan, &bus(0)),
        ];
        assert_eq!(pick(&infos, &AdapterSelector::default()), vec![2, 1]);
        // Asked for: by cpu(), by the selector's name, by WGPU_ADAPTER_NAME.
        assert_eq!(pick(&infos, &AdapterSelector::default().cpu()), vec![0]);
        assert_eq!(
            pick(&infos, &AdapterSelector::default().name("LLVMpipe")),
            vec![0]
        );
        let env = Wanted::resolve(&AdapterSelector::default(), Some("llvmpipe".into()), None);
        assert_eq!(select(&infos, &env).picked, vec![0]);
        // The selector's own name wins over the environment's.
        let both = Wanted::resolve(
            &AdapterSelector::default().name("h100"),
            Some("llvmpipe".into()),
            None,
        );
        assert_eq!(select(&infos, &both).picked, vec![2, 1]);
    }

    #[test]
    fn cpu_adapter_alone_is_taken() {
        let infos = [llvmpipe(Backend::Vulkan)];
        assert_eq!(pick(&infos, &AdapterSelector::default()), vec![0]);
        // Through Vulkan and GL: one, the Vulkan one, and GL not eligible by default.
        let infos = [llvmpipe(Backend::Gl), llvmpipe(Backend::Vulkan)];
        assert_eq!(pick(&infos, &AdapterSelector::default()), vec![1]);
        // GL alone: taken when nothing else exists.
        let infos = [llvmpipe(Backend::Gl)];
        assert_eq!(pick(&infos, &AdapterSelector::default()), vec![0]);
        // Asking for GPUs by name where only a CPU adapter exists: nothing.
        assert!(pick(&infos, &AdapterSelector::default().name("nvidia")).is_empty());
    }

    /// Runs discovery over `host` (what each backend would list), recording the passes.
    fn passes_for(
        host: &[AdapterInfo],
        want: &Wanted,
    ) -> (Result<Vec<AdapterInfo>>, Vec<Backends>) {
        let mut asked = Vec::new();
        let got = discover_with(
            want,
            |pass| {
                asked.push(pass);
                host.iter()
                    .filter(|i| pass.contains(Backends::from(i.backend)))
                    .cloned()
                    .collect()
            },
            AdapterInfo::clone,
        );
        (got, asked)
    }

    #[test]
    fn gl_is_enumerated_only_when_nothing_else_is_eligible() {
        let default = Wanted::resolve(&AdapterSelector::default(), None, None);
        let host = [llvmpipe(Backend::Gl), llvmpipe(Backend::Vulkan)];
        let (got, asked) = passes_for(&host, &default);
        assert_eq!(asked, vec![Backends::PRIMARY]);
        assert_eq!(got.map(|v| v.len()).ok(), Some(1));
        // Past the host's adapters: no GL pass either (it would not add a primary adapter),
        // and the error says how many there are.
        let past = Wanted::resolve(&AdapterSelector::default().local(1), None, None);
        let (got, asked) = passes_for(&host, &past);
        assert_eq!(asked, vec![Backends::PRIMARY]);
        let msg = got.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("local adapter 1 (the host has 1)"), "{msg}");
        // GL only: the second pass finds it.
        let (got, asked) = passes_for(&host[..1], &default);
        assert_eq!(asked, vec![Backends::PRIMARY, Backends::GL]);
        assert_eq!(got.map(|v| v.len()).ok(), Some(1));
        // Nothing at all: both passes, and an error naming what was looked for.
        let (got, asked) = passes_for(&[], &default);
        assert_eq!(asked.len(), 2);
        assert!(matches!(got, Err(Error::NoAdapter { .. })));
    }

    #[test]
    fn environment_backends_are_explicit() {
        let infos = [gpu(Backend::Gl, ""), llvmpipe(Backend::Vulkan)];
        let want = Wanted::resolve(&AdapterSelector::default(), None, Some(Backends::GL));
        assert_eq!(want.passes(), vec![Backends::GL]);
        assert_eq!(select(&infos, &want).picked, vec![0]);
        let default = Wanted::resolve(&AdapterSelector::default(), None, None);
        assert_eq!(default.passes(), vec![Backends::PRIMARY, Backends::GL]);
        // Without named backends, the Vulkan CPU adapter comes before a GL pass.
        assert_eq!(select(&infos, &default).picked, vec![1]);
    }
}
