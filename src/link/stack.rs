//! The link stack: which wrappers go around a rank's link, kept out of
//! [`CommConfig`](crate::CommConfig) because emulation and fault injection are test and bench
//! machinery, not settings of a production communicator.
//!
//! The wrappers compose as types over any [`Link`] (`FaultyLink<EmulatedLink<L>>`), so the same
//! stack wraps an in-process link or, one per process, a network link.

use std::time::Instant;

use super::{
    Checksummed, EmulatedLink, FaultPlan, Link, LinkEmulation, TcpLink, TcpOptions, in_process_mesh,
};
use crate::error::Result;

/// The wrappers to put around each rank's link: an emulated network, injected faults, both, or
/// none (the default).
///
/// [`wrap`](Self::wrap) composes them in a fixed order, faults outside the emulation
/// (`FaultyLink<EmulatedLink<L>>`): a frame a fault drops never occupies the emulated wire, and
/// a delay the plan injects comes on top of the emulated latency, as a slow sender in front of a
/// network would. With faults, a [`Checksummed`] layer goes outermost
/// (`Checksummed<FaultyLink<…>>`): the plan can corrupt frames, and a checksum above the layer
/// that flips the bits is what catches them, as TCP's does above the network.
///
/// ```
/// # fn main() -> Result<(), wccl::link::LinkError> {
/// use std::time::{Duration, Instant};
/// use wccl::link::{FaultPlan, Frame, Link, LinkEmulation, LinkStack, in_process_mesh};
/// let faults = FaultPlan::new();
/// let stack = LinkStack::new()
///     .emulate(LinkEmulation { gbps: 10.0, latency_us: 50.0, jitter_us: 0.0 })
///     .faults(faults.clone());
/// // Every link of one mesh shares the emulation's epoch.
/// let epoch = Instant::now();
/// let links: Vec<_> = in_process_mesh(2).into_iter().map(|l| stack.wrap(l, epoch)).collect();
/// faults.drop_next(0, 1, 1);
/// links[0].send(1, Frame { header: vec![1], payload: vec![] })?; // lost on the wire
/// links[0].send(1, Frame { header: vec![2], payload: vec![] })?;
/// let got = links[1].recv(0, Instant::now() + Duration::from_secs(5))?;
/// assert_eq!(got.header, vec![2]);
/// assert_eq!(faults.dropped(), 1);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
pub struct LinkStack {
    emulation: Option<LinkEmulation>,
    faults: Option<FaultPlan>,
    /// The links at the bottom of a group's stack: crossbeam channels (`None`), or loopback TCP
    /// sockets between the group's threads.
    tcp: Option<TcpOptions>,
}

impl LinkStack {
    /// No wrappers: [`wrap`](Self::wrap) returns the link itself, boxed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Emulates a network with these characteristics (an [`EmulatedLink`] around the link).
    pub fn emulate(mut self, emulation: LinkEmulation) -> Self {
        self.emulation = Some(emulation);
        self
    }

    /// Injects the faults of `plan` (a [`FaultyLink`](super::FaultyLink), inside a
    /// [`Checksummed`] layer that catches the frames it corrupts). The plan is shared: keep a
    /// clone to turn faults on and off while the ranks run.
    pub fn faults(mut self, plan: FaultPlan) -> Self {
        self.faults = Some(plan);
        self
    }

    /// Builds a group's links over loopback TCP sockets ([`TcpLink::loopback_mesh`]) instead
    /// of channels: the same transport as across processes, wrappers and all, inside one test.
    pub fn tcp(mut self, options: TcpOptions) -> Self {
        self.tcp = Some(options);
        self
    }

    /// The TCP options of the base links, if they are TCP.
    pub fn tcp_options(&self) -> Option<&TcpOptions> {
        self.tcp.as_ref()
    }

    /// The links of a group of `n` ranks in this process: the base mesh (channels, or loopback
    /// TCP), each wrapped by this stack.
    pub fn mesh(&self, n: usize) -> Result<Vec<Box<dyn Link>>> {
        // One epoch for the whole mesh: emulated frames carry delivery times relative to it.
        let epoch = Instant::now();
        Ok(match &self.tcp {
            Some(o) => TcpLink::loopback_mesh(n, o)?
                .into_iter()
                .map(|l| self.wrap(l, epoch))
                .collect(),
            None => in_process_mesh(n)
                .into_iter()
                .map(|l| self.wrap(l, epoch))
                .collect(),
        })
    }

    /// The emulation, if any.
    pub fn emulation(&self) -> Option<LinkEmulation> {
        self.emulation
    }

    /// The fault plan, if any.
    pub fn fault_plan(&self) -> Option<&FaultPlan> {
        self.faults.as_ref()
    }

    /// Wraps one rank's link: `Checksummed<FaultyLink<EmulatedLink<L>>>`,
    /// `Checksummed<FaultyLink<L>>`, `EmulatedLink<L>` or `L`, by what the stack holds. `epoch`
    /// is the emulation's clock origin (unused without one): every link of one mesh must get
    /// the same, since a frame carries its delivery time relative to it.
    pub fn wrap<L: Link + 'static>(&self, link: L, epoch: Instant) -> Box<dyn Link> {
        match (self.emulation, &self.faults) {
            (Some(emu), Some(plan)) => Box::new(Checksummed::new(
                plan.wrap_one(EmulatedLink::new(link, emu, epoch)),
            )),
            (None, Some(plan)) => Box::new(Checksummed::new(plan.wrap_one(link))),
            (Some(emu), None) => Box::new(EmulatedLink::new(link, emu, epoch)),
            (None, None) => Box::new(link),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::link::{Frame, LinkError, in_process_mesh};

    fn frame(tag: u8, len: usize) -> Frame {
        Frame {
            header: vec![tag, tag.wrapping_add(1)],
            payload: (0..len).map(|i| (i % 251) as u8 ^ tag).collect(),
        }
    }

    fn mesh(stack: &LinkStack, n: usize) -> Vec<Box<dyn Link>> {
        let epoch = Instant::now();
        in_process_mesh(n)
            .into_iter()
            .map(|l| stack.wrap(l, epoch))
            .collect()
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[test]
    fn the_emulation_holds_frames_for_its_latency() {
        let emu = LinkEmulation {
            gbps: 100.0,
            latency_us: 40_000.0,
            jitter_us: 0.0,
        };
        let links = mesh(&LinkStack::new().emulate(emu), 2);
        let t = Instant::now();
        links[1].send(0, frame(7, 333)).expect("send");
        let got = links[0].recv(1, soon()).expect("recv");
        // A lower bound only: a loaded machine may deliver late, never early.
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(got.header, frame(7, 333).header, "the stamp is stripped");
        assert_eq!(got.payload, frame(7, 333).payload);
    }

    /// `EmulatedLink<TcpLink>` and `FaultyLink<EmulatedLink<TcpLink>>`: the wrappers compose
    /// over TCP as over channels.
    #[test]
    fn the_wrappers_compose_over_tcp_links() {
        let emu = LinkEmulation {
            gbps: 100.0,
            latency_us: 40_000.0,
            jitter_us: 0.0,
        };
        let plan = FaultPlan::new();
        let stack = LinkStack::new()
            .tcp(crate::link::TcpOptions::default())
            .emulate(emu)
            .faults(plan.clone());
        let links = stack.mesh(3).expect("a loopback mesh");
        let t = Instant::now();
        links[1].send(0, frame(7, 333)).expect("send");
        let got = links[0].recv(1, soon()).expect("recv");
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(got, frame(7, 333), "the stamp is stripped");
        plan.kill(2);
        assert_eq!(links[0].recv(2, soon()).err(), Some(LinkError::Gone(2)));
    }

    #[test]
    fn the_plan_applies_to_every_link_of_the_stack() {
        let plan = FaultPlan::new();
        let links = mesh(&LinkStack::new().faults(plan.clone()), 3);
        plan.drop_next(0, 1, 1);
        links[0].send(1, frame(1, 10)).expect("send");
        links[0].send(1, frame(2, 10)).expect("send");
        assert_eq!(
            links[1].recv(0, soon()).expect("recv").header,
            frame(2, 10).header
        );
        assert_eq!(plan.dropped(), 1);
        plan.kill(2);
        assert_eq!(links[0].recv(2, soon()).err(), Some(LinkError::Gone(2)));
    }

    #[test]
    fn faults_wrap_the_emulation_not_the_other_way_round() {
        // Faults outermost: the plan's delay holds the frame back before it enters the emulated
        // wire, so the two add up. Emulation outermost would stamp the delivery time first, and
        // the delay would hide inside the latency (about max(delay, latency) in all).
        let emu = LinkEmulation {
            gbps: 100.0,
            latency_us: 60_000.0,
            jitter_us: 0.0,
        };
        let plan = FaultPlan::new();
        let links = mesh(&LinkStack::new().emulate(emu).faults(plan.clone()), 2);
        plan.delay(0, Duration::from_millis(60));
        let t = Instant::now();
        links[0].send(1, frame(3, 64)).expect("send");
        let got = links[1].recv(0, soon()).expect("recv");
        assert!(
            t.elapsed() >= Duration::from_millis(120),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(got.payload, frame(3, 64).payload);
    }
}
