//! The core quotas of a Batch account as allocation meets them: a pool gets the nodes the
//! account's cores still allow (`dedicatedCoreQuota`, the VM family's quota when
//! `dedicatedCoreQuotaPerVMFamilyEnforced`, `lowPriorityCoreQuota`) and no more. Azure takes such
//! a resize and stops at the quota; the pool stays resizing until its resize timeout and then ends
//! steady with the resize error naming the quota that stopped it.

use crate::emulator::clock::EmuTime;
use crate::emulator::state::{POOL_DELETE, Pool, State};
use crate::emulator::vm_sizes;
use crate::emulator::world::BatchAccount;

/// How many nodes of each kind the account's cores leave for one pool, and the resize error of
/// the quota that binds when the pool asks for more.
#[derive(Debug, Clone, PartialEq)]
pub struct Room {
    pub dedicated: u32,
    pub low_priority: u32,
    pub dedicated_code: &'static str,
}

pub const ACCOUNT_CORE_QUOTA_REACHED: &str = "AccountCoreQuotaReached";
pub const VM_SERIES_CORE_QUOTA_REACHED: &str = "AccountVMSeriesCoreQuotaReached";
pub const LOW_PRIORITY_CORE_QUOTA_REACHED: &str = "AccountLowPriorityCoreQuotaReached";

/// The message Batch gives with each code.
pub fn message(code: &str) -> &'static str {
    match code {
        VM_SERIES_CORE_QUOTA_REACHED => "The specified account has reached its VM series core quota.",
        LOW_PRIORITY_CORE_QUOTA_REACHED => "The specified account has reached its low priority core quota.",
        _ => "The specified account has reached its VM core quota.",
    }
}

/// The room `account` has for pool `pool_id` of size `vm_size`: its cores less what the account's
/// other pools hold (their nodes not yet removed, including those still arriving).
pub fn room(st: &State, account: &BatchAccount, pool_id: &str, vm_size: &str, now: EmuTime) -> Room {
    let Some((family, vcpus)) = vm_sizes::cores(vm_size).filter(|(_, v)| *v > 0) else {
        return Room {
            dedicated: u32::MAX,
            low_priority: u32::MAX,
            dedicated_code: ACCOUNT_CORE_QUOTA_REACHED,
        };
    };
    let mut dedicated = 0u64;
    let mut in_family = 0u64;
    let mut low = 0u64;
    let others = st
        .pools
        .values()
        .filter(|p| p.account.eq_ignore_ascii_case(&account.name) && !p.id.eq_ignore_ascii_case(pool_id))
        .filter(|p| p.deleting.is_none_or(|since| now < since + POOL_DELETE));
    for other in others {
        let (other_family, other_vcpus) = cores_of(other);
        for node in other.nodes.iter().filter(|n| n.removed.is_none_or(|r| now < r)) {
            let cores = u64::from(other_vcpus);
            if node.dedicated {
                dedicated += cores;
                if other_family == family {
                    in_family += cores;
                }
            } else {
                low += cores;
            }
        }
    }
    let left = |quota: u32, used: u64| u64::from(quota).saturating_sub(used) / u64::from(vcpus);
    let by_account = left(account.dedicated_core_quota, dedicated);
    let by_family = account.per_family_enforced.then(|| {
        left(
            account
                .dedicated_core_quota_per_family
                .get(family)
                .copied()
                .unwrap_or(0),
            in_family,
        )
    });
    let (dedicated_room, dedicated_code) = match by_family {
        Some(family_room) if family_room < by_account => (family_room, VM_SERIES_CORE_QUOTA_REACHED),
        _ => (by_account, ACCOUNT_CORE_QUOTA_REACHED),
    };
    Room {
        dedicated: u32::try_from(dedicated_room).unwrap_or(u32::MAX),
        low_priority: u32::try_from(left(account.low_priority_core_quota, low)).unwrap_or(u32::MAX),
        dedicated_code,
    }
}

fn cores_of(pool: &Pool) -> (&'static str, u32) {
    pool.body["vmSize"]
        .as_str()
        .and_then(vm_sizes::cores)
        .unwrap_or(("", 0))
}
