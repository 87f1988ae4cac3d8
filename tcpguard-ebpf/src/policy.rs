//! Source policy: deny-listed sources are dropped, allow-listed ones skip the cookie round trip,
//! and a source with as many tracked connections as it may have gets no more.

use core::mem::MaybeUninit;

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
};
use tcpguard_common::{
    FULL_SOURCES_CAPACITY, FlowKey, POLICY_ALLOW, POLICY_CAPACITY, POLICY_DENY, POLICY_SLOT,
    POLICY_SOURCE_LIMIT, Policy, SourceKey,
};

use crate::zero;

#[map(name = "POLICY")]
static POLICY: Array<Policy> = Array::with_max_entries(1, 0);

// Two slots of tries; POLICY_SLOT says which is in force (see tcpguard-common).
#[map(name = "ALLOW_V4")]
static ALLOW_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(POLICY_CAPACITY, 0);

#[map(name = "ALLOW_V6")]
static ALLOW_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(POLICY_CAPACITY, 0);

#[map(name = "DENY_V4")]
static DENY_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(POLICY_CAPACITY, 0);

#[map(name = "DENY_V6")]
static DENY_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(POLICY_CAPACITY, 0);

#[map(name = "ALLOW_V4_1")]
static ALLOW_V4_1: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(POLICY_CAPACITY, 0);

#[map(name = "ALLOW_V6_1")]
static ALLOW_V6_1: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(POLICY_CAPACITY, 0);

#[map(name = "DENY_V4_1")]
static DENY_V4_1: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(POLICY_CAPACITY, 0);

#[map(name = "DENY_V6_1")]
static DENY_V6_1: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(POLICY_CAPACITY, 0);

#[map(name = "FULL_SOURCES")]
static FULL_SOURCES: HashMap<SourceKey, u8> = HashMap::with_max_entries(FULL_SOURCES_CAPACITY, 0);

/// The policies in force ([`Policy::lists`]), read once per packet: the lists and the slot
/// of tries they are in come from the same byte.
#[derive(Clone, Copy)]
pub struct Lists(u8);

#[inline(always)]
pub fn lists() -> Lists {
    Lists(POLICY.get(0).map_or(0, |policy| policy.lists))
}

impl Lists {
    /// Whether the client of `key` is deny-listed.
    #[inline(always)]
    pub fn denied(self, key: &FlowKey) -> bool {
        self.0 & POLICY_DENY != 0
            && if self.0 & POLICY_SLOT == 0 {
                listed(key, &DENY_V4, &DENY_V6)
            } else {
                listed(key, &DENY_V4_1, &DENY_V6_1)
            }
    }

    /// Whether the client of `key` is allow-listed.
    #[inline(always)]
    pub fn allowed(self, key: &FlowKey) -> bool {
        self.0 & POLICY_ALLOW != 0
            && if self.0 & POLICY_SLOT == 0 {
                listed(key, &ALLOW_V4, &ALLOW_V6)
            } else {
                listed(key, &ALLOW_V4_1, &ALLOW_V6_1)
            }
    }

    /// Whether the client of `key` already has as many tracked connections as it may have.
    #[inline(always)]
    pub fn source_full(self, key: &FlowKey) -> bool {
        if self.0 & POLICY_SOURCE_LIMIT == 0 {
            return false;
        }
        // The key is built in zeroed memory rather than by `key.source()`, whose zero padding
        // LLVM writes with a call to `memset` (see crate::zero). `memset` is a global function
        // in the object, which the verifier checks on its own against its BTF signature, and
        // Linux 6.1's refuses that signature's pointer argument ("reg type unsupported for
        // arg#0 function memset"), and with it the program. The kernel-cookie program now
        // calls no function but its own body.
        let mut slot = MaybeUninit::uninit();
        // SAFETY: SourceKey is plain old data; all-zero is a valid value.
        let source: &mut SourceKey = unsafe { zero::zeroed_in(&mut slot) };
        source.addr = key.client_addr;
        source.family = key.family;
        FULL_SOURCES.get_ptr(source).is_some()
    }
}

#[inline(always)]
fn listed(key: &FlowKey, v4: &LpmTrie<[u8; 4], u8>, v6: &LpmTrie<[u8; 16], u8>) -> bool {
    if key.family == tcpguard_common::FLOW_IPV4 {
        let address = [
            key.client_addr[0],
            key.client_addr[1],
            key.client_addr[2],
            key.client_addr[3],
        ];
        v4.get(Key::new(32, address)).is_some()
    } else {
        v6.get(Key::new(128, key.client_addr)).is_some()
    }
}
