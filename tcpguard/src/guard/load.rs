//! Loading the programs into the kernel (with their maps, reused from the pin directory where
//! an earlier daemon pinned them), pinning the programs, and the verifier's refusal in a few
//! lines.

use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, Xdp},
};
use tcpguard_common::{
    DEFAULT_FLOW_CAPACITY, EGRESS_PROGRAM, XDP_OWN_COOKIES_PROGRAM, XDP_PROGRAM, maps, xdp_program,
};

use super::{Guard, GuardError};
use crate::{
    bpffs,
    ebpf::TCPGUARD_OBJECT,
    tc::{self, TcMode},
};

/// Removes from `dir` the pins of maps an earlier tcpguard had and this one does not
/// ([`bpffs::RETIRED_MAPS`]), among them the protected ports of the versions that kept them in
/// an array map of 65,536 entries: nothing reads them any more.
fn remove_retired_pins(dir: &Path) -> Result<(), GuardError> {
    for name in bpffs::RETIRED_MAPS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        bpffs::remove_pin(&path).map_err(|source| GuardError::RetiredPin {
            path: path.clone(),
            source,
        })?;
        log::info!(
            "removed {}: a map an earlier tcpguard pinned and this one no longer has",
            path.display()
        );
    }
    Ok(())
}

/// Where the programs are loaded from and kept.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Directory on a BPF filesystem for maps, programs and links; `None`: nothing pinned.
    pub pin_dir: Option<PathBuf>,
    /// Entries in each family's flow map.
    pub flow_capacity: u32,
    /// Load the XDP program that answers with tcpguard's own cookies rather than the
    /// kernel's.
    pub own_cookies: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            pin_dir: None,
            flow_capacity: DEFAULT_FLOW_CAPACITY,
            own_cookies: false,
        }
    }
}

impl Guard {
    /// Loads the programs for the kernel's cookies or (`own_cookies`) tcpguard's, unpinned, and
    /// writes `ports` (protected for IPv4 and IPv6) and `config`: what BPF_PROG_TEST_RUN tests
    /// need.
    #[cfg(feature = "testing")]
    pub fn load(
        ports: &BTreeSet<u16>,
        config: tcpguard_common::SynCookieConfig,
        own_cookies: bool,
    ) -> Result<Self, GuardError> {
        let mut guard = Self::load_with(&LoadOptions {
            own_cookies,
            ..LoadOptions::default()
        })?;
        guard.set_ports(ports)?;
        guard.set_syn_cookie_config(config)?;
        Ok(guard)
    }

    /// Loads the programs. With a pin directory, the maps of [`maps::ALL`] already pinned
    /// there (by an earlier daemon) are reused, with their flows and counters, and the others
    /// of that list are pinned there; pins of maps this tcpguard no longer has are removed.
    /// The port table, the log's ring and the scratch maps are each load's own.
    pub fn load_with(options: &LoadOptions) -> Result<Self, GuardError> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(maps::FLOWS_V4, options.flow_capacity);
        loader.map_max_entries(maps::FLOWS_V6, options.flow_capacity);
        let map_paths: Vec<(&str, PathBuf)> = match &options.pin_dir {
            Some(dir) => {
                bpffs::prepare_pin_dir(dir)?;
                remove_retired_pins(dir)?;
                maps::ALL
                    .iter()
                    .map(|&name| (name, dir.join(name)))
                    .collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(TCPGUARD_OBJECT)?;
        let xdp_name = xdp_program(options.own_cookies);
        let xdp: &mut Xdp = program_mut(&mut ebpf, xdp_name)?;
        xdp.load().map_err(verifier(xdp_name))?;
        let tc: &mut SchedClassifier = program_mut(&mut ebpf, EGRESS_PROGRAM)?;
        tc.load().map_err(verifier(EGRESS_PROGRAM))?;
        Ok(Self {
            ebpf,
            xdp: xdp_name,
            pin_dir: options.pin_dir.clone(),
            attachment: None,
            ports: BTreeSet::new(),
            interface_mac: [0; 6],
        })
    }

    /// The loaded XDP program, for BPF_PROG_TEST_RUN.
    #[cfg(feature = "testing")]
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(self.xdp)
            .and_then(|program| program.try_into().ok())
            .expect("Guard::load_with checked the program exists and is XDP")
    }

    /// The instructions the verifier processed to accept the TC egress program, if the kernel
    /// says.
    #[cfg(feature = "testing")]
    pub fn egress_verified_instructions(&self) -> Option<u32> {
        let program: &SchedClassifier = self.ebpf.program(EGRESS_PROGRAM)?.try_into().ok()?;
        program.info().ok()?.verified_instruction_count()
    }

    pub(super) fn pin_programs(&mut self, dir: &Path) -> Result<(), GuardError> {
        let pin_error = |path: &Path, source| GuardError::Pin {
            dir: path.to_owned(),
            source,
        };
        // An earlier daemon's programs, of either cookie mode: no longer attached anywhere.
        for name in [XDP_PROGRAM, XDP_OWN_COOKIES_PROGRAM, EGRESS_PROGRAM] {
            let path = dir.join(bpffs::program_pin(name));
            bpffs::remove_pin(&path).map_err(|err| pin_error(&path, err))?;
        }
        let mut pins: Vec<(&'static str, PathBuf)> = [self.xdp, EGRESS_PROGRAM]
            .into_iter()
            .map(|name| (name, dir.join(bpffs::program_pin(name))))
            .collect();
        // A netlink filter is recorded with a pin of its program (see crate::tc).
        if let Some(attachment) = &self.attachment
            && attachment.tc_mode == TcMode::Netlink
        {
            let marker =
                tc::marker(dir, &attachment.interface).map_err(|err| pin_error(dir, err))?;
            bpffs::remove_pin(&marker).map_err(|err| pin_error(&marker, err))?;
            pins.push((EGRESS_PROGRAM, marker));
        }
        for (name, path) in pins {
            let program = self
                .ebpf
                .program_mut(name)
                .ok_or(GuardError::MissingProgram(name))?;
            program
                .pin(&path)
                .map_err(|source| pin_error(&path, io::Error::other(source)))?;
        }
        Ok(())
    }
}

pub(super) fn program_mut<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut T, GuardError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(GuardError::MissingProgram(name))?
        .try_into()
        .map_err(|_| GuardError::ProgramType {
            name,
            expected: std::any::type_name::<T>()
                .rsplit("::")
                .next()
                .unwrap_or("?"),
        })
}

/// Why a program did not load, in a few lines: the error, and the last lines of the verifier's
/// log, which say why it refused. The whole log can run to a hundred thousand lines, more than
/// journald keeps from one burst.
pub fn rejection(error: &aya::programs::ProgramError) -> String {
    const LAST_LINES: usize = 25;
    match error {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LAST_LINES)..];
            format!(
                "{io_error}; the last {} of the verifier's {} log lines:\n{}",
                tail.len(),
                lines.len(),
                tail.join("\n")
            )
        }
        other => other.to_string(),
    }
}

fn verifier(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> GuardError {
    move |source| GuardError::Verifier { name, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loading a program as the wrong type is a defect of the object, not something the
    /// verifier said: it must not pass for a rejection (which `cookie_mode = "auto"` answers by
    /// falling back to the kernel's cookies).
    #[test]
    fn a_program_of_another_type_is_not_a_verifier_rejection() {
        let mut ebpf = Ebpf::load(TCPGUARD_OBJECT).expect("loading the maps (needs root)");
        let Err(err) = program_mut::<Xdp>(&mut ebpf, EGRESS_PROGRAM) else {
            panic!("the egress program taken for XDP");
        };
        assert!(
            matches!(
                err,
                GuardError::ProgramType {
                    name: EGRESS_PROGRAM,
                    expected: "Xdp"
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "program \"tcpguard_egress\" in the eBPF object is not of the type tcpguard loads \
             it as (Xdp)"
        );
    }
}
