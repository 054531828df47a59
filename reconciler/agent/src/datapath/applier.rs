//! The ordered applier: writes a [`Plan`] to the maps of a [`MapBackend`] step by step, in
//! the order of [`Plan::steps`] (the only definition of it), then moves the policy
//! generation on; and reads the maps back into a [`MapState`] (at start, after a failed
//! apply, and by the drift check).
use super::{DatapathError, MapBackend, bulk};
use crate::mapstate::{IntoKernel, MapLimits, MapState, MapVisitor, Plan, Room, Step, TableMap, WritableMap, Writes};

/// Applies plan `p` to the maps, which hold `loaded` and have the sizes `limits`, one
/// [`Plan::steps`] step after the other. Adds that do not fit beside a map's old entries
/// are written right after that map's deletes ([`Room`]). On error the maps hold part of
/// the plan: read them back before planning again.
pub fn apply_plan<B>(maps: &mut B, p: &Plan, loaded: &MapState, limits: &MapLimits) -> Result<(), DatapathError>
where
    B: MapBackend + ?Sized,
{
    let room = Room::new(loaded, limits);
    for step in Plan::steps() {
        step.map.visit(WriteStep { maps: &mut *maps, plan: p, step, room: &room })?;
    }
    // Last: established flows are re-checked against everything written above (see
    // `config::POLICY_GEN`).
    if !p.is_empty() {
        maps.bump_policy_generation()?;
    }
    Ok(())
}

/// Writes one step.
struct WriteStep<'a, B: ?Sized> {
    maps: &'a mut B,
    plan: &'a Plan,
    step: Step,
    room: &'a Room,
}

impl<B: MapBackend + ?Sized> MapVisitor for WriteStep<'_, B> {
    type Output = Result<(), DatapathError>;
    fn visit<M: TableMap>(self, _: M) -> Self::Output {
        match self.step.writes::<M>(self.plan, self.room) {
            Writes::Upserts(entries) => {
                let entries: Vec<(M::Kernel, M::Value)> = entries.iter().map(|(k, v)| (k.to_kernel(), *v)).collect();
                bulk::upsert(self.maps, M::MAP, &entries)
            }
            Writes::Deletes(keys) => {
                let keys: Vec<M::Kernel> = keys.iter().map(IntoKernel::to_kernel).collect();
                bulk::delete(self.maps, M::MAP, &keys)
            }
        }
    }
}

/// Reads what the maps the agent writes hold.
pub fn read_state<B: MapBackend + ?Sized>(maps: &B) -> Result<MapState, DatapathError> {
    read_maps(maps, WritableMap::ALL)
}

/// Reads what maps `which` hold (the others are left empty).
pub fn read_maps<B: MapBackend + ?Sized>(
    maps: &B,
    which: impl IntoIterator<Item = WritableMap>,
) -> Result<MapState, DatapathError> {
    let mut state = MapState::default();
    for m in which {
        m.visit(ReadMap { maps, state: &mut state })?;
    }
    Ok(state)
}

/// Reads one map into the state.
struct ReadMap<'a, B: ?Sized> {
    maps: &'a B,
    state: &'a mut MapState,
}

impl<B: MapBackend + ?Sized> MapVisitor for ReadMap<'_, B> {
    type Output = Result<(), DatapathError>;
    fn visit<M: TableMap>(self, _: M) -> Self::Output {
        let entries: Vec<(M::Kernel, M::Value)> = bulk::read_all(self.maps, M::MAP)?;
        M::state_mut(self.state).extend(entries.into_iter().map(|(k, v)| (M::Key::from_kernel(k), v)));
        Ok(())
    }
}

/// The sizes of the maps the agent writes, as the backend has them.
pub fn map_limits<B: MapBackend + ?Sized>(maps: &B) -> Result<MapLimits, DatapathError> {
    let mut limits = MapLimits::UNLIMITED;
    for m in WritableMap::ALL {
        limits.set(m, maps.max_entries(m)?);
    }
    Ok(limits)
}
