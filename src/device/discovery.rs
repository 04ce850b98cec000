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
        match self.backends.or_else(Backends::from_env) {
            Some(b) => (b, true),
            None => (Backends::all(), false),
        }
    }
}

/// Lists the adapters a selector admits, each physical GPU once, best backend first.
pub fn discover_adapters(instance: &Instance, selector: &AdapterSelector) -> Result<Vec<Adapter>> {
    let name = selector.effective_name();
    let (backends, explicit) = selector.effective_backends();
    let mut found = Vec::new();
    let mut chosen = Vec::new();
    // GL only when asked for, or when no Vulkan/Metal/DX12 adapter matches (GL is probed only
    // then: probing it is slow and noisy on headless machines).
    let passes = if explicit {
        vec![backends]
    } else {
        vec![Backends::PRIMARY, Backends::GL]
    };
    for pass in passes {
        let all = pollster::block_on(instance.enumerate_adapters(pass));
        found.extend(all.iter().map(describe_one));
        chosen = all
            .into_iter()
            .filter(|a| {
                let n = a.get_info().name.to_lowercase();
                name.as_ref()
                    .is_none_or(|want| n.contains(&want.to_lowercase()))
            })
            .collect();
        if !chosen.is_empty() {
            break;
        }
    }
    chosen.sort_by_key(|a| backend_rank(a.get_info().backend));
    // The same GPU seen through two backends: keep the first (best) one.
    let mut seen: Vec<(u32, u32, String)> = Vec::new();
    chosen.retain(|a| {
        let i = a.get_info();
        let dup = seen.iter().any(|(vendor, device, name)| {
            let same_id =
                (*vendor, *device) != (0, 0) && (*vendor, *device) == (i.vendor, i.device);
            same_id || *name == i.name
        });
        if !dup {
            seen.push((i.vendor, i.device, i.name.clone()));
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
        let found = if found.is_empty() {
            "none (is a Vulkan driver installed? on Debian: apt-get install -y mesa-vulkan-drivers)"
                .to_string()
        } else {
            found.join(", ")
        };
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

fn describe_one(a: &Adapter) -> String {
    let i = a.get_info();
    format!("'{}' ({:?})", i.name, i.backend)
}
