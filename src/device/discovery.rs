//! Finding adapters: each GPU once, Vulkan/Metal/DX12 before GL, filtered by name and backend.

use wgpu::{Adapter, Backend, Backends, Instance};

use crate::error::{Error, Result};

/// Which adapters a communicator may use.
///
/// By default every Vulkan, Metal and DX12 adapter, GL only when none of those exists. wgpu's
/// environment variables are honoured when the selector leaves the choice open: `WGPU_BACKEND`
/// (for example `vulkan` or `gl`) picks the backends, `WGPU_ADAPTER_NAME` a name substring.
///
/// ```
/// use wccl::AdapterSelector;
/// let sel = AdapterSelector::default().name("llvmpipe").backends(wgpu::Backends::VULKAN);
/// assert_eq!(sel.name_filter(), Some("llvmpipe"));
/// ```
#[derive(Clone, Debug, Default)]
pub struct AdapterSelector {
    backends: Option<Backends>,
    name: Option<String>,
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

    /// The name filter in force: the one set here, else `WGPU_ADAPTER_NAME`.
    pub fn name_filter(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn effective_name(&self) -> Option<String> {
        self.name
            .clone()
            .or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok())
            .filter(|n| !n.is_empty())
    }

    fn effective_backends(&self) -> (Backends, bool) {
        match self.backends.or_else(|| Backends::from_env()) {
            Some(b) => (b, true),
            None => (Backends::all(), false),
        }
    }
}

/// Lists the adapters a selector admits, each physical GPU once, best backend first.
pub fn discover_adapters(instance: &Instance, selector: &AdapterSelector) -> Result<Vec<Adapter>> {
    let (backends, explicit) = selector.effective_backends();
    let all = pollster::block_on(instance.enumerate_adapters(backends));
    let found = describe(&all);
    let name = selector.effective_name();
    let mut chosen: Vec<Adapter> = all
        .into_iter()
        .filter(|a| match &name {
            Some(n) => a
                .get_info()
                .name
                .to_lowercase()
                .contains(&n.to_lowercase()),
            None => true,
        })
        .collect();
    // GL only when nothing else exists, unless GL was asked for by name of backend.
    let asked_gl = explicit && backends.contains(Backends::GL);
    if !asked_gl && chosen.iter().any(|a| a.get_info().backend != Backend::Gl) {
        chosen.retain(|a| a.get_info().backend != Backend::Gl);
    }
    chosen.sort_by_key(|a| backend_rank(a.get_info().backend));
    // The same GPU seen through two backends: keep the first (best) one.
    let mut seen: Vec<(u32, u32, String)> = Vec::new();
    chosen.retain(|a| {
        let i = a.get_info();
        let key = (i.vendor, i.device, i.name.clone());
        let dup = seen
            .iter()
            .any(|s| (s.0 != 0 || s.1 != 0) && s.0 == key.0 && s.1 == key.1 || s.2 == key.2);
        if !dup {
            seen.push(key);
        }
        !dup
    });
    if chosen.is_empty() {
        let wanted = format!(
            "backends {:?}{}",
            backends,
            name.map(|n| format!(" and name containing '{n}'"))
                .unwrap_or_default()
        );
        return Err(Error::NoAdapter { wanted, found });
    }
    Ok(chosen)
}

fn backend_rank(b: Backend) -> u8 {
    match b {
        Backend::Vulkan | Backend::Metal | Backend::Dx12 => 0,
        Backend::Gl => 2,
        _ => 1,
    }
}

fn describe(adapters: &[Adapter]) -> String {
    if adapters.is_empty() {
        return "none (is a Vulkan driver installed? on Debian: apt-get install -y mesa-vulkan-drivers)".into();
    }
    adapters
        .iter()
        .map(|a| {
            let i = a.get_info();
            format!("'{}' ({:?})", i.name, i.backend)
        })
        .collect::<Vec<_>>()
        .join(", ")
}
