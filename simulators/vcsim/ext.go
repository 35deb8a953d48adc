package main

// Extensions of the simulator's VirtualMachine and VirtualMachineSnapshot:
// snapshots backed by copies of the live disk images, changed block
// tracking with change ids, and QueryChangedDiskAreas answered from what
// really changed between two images.

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type diskState struct {
	key      int32
	capacity int64
	live     string
}

type vmState struct {
	ref          types.ManagedObjectReference
	dir          string
	disks        []diskState
	epoch        string          // current tracking epoch; "" when CBT is off
	counters     map[int32]int   // last change number per disk in the epoch
	failSnapshot bool            // fault injection
	failQuiesce  bool            // fault injection: quiescing the guest fails
	shutdown     string          // how the guest answers ShutdownGuest: "", "no_tools", "ignored"
	denied       map[string]bool // privileges reported as not granted on this VM
	snapSeq      int32           // snapshot tree ids
}

func (st *vmState) disk(key int32) *diskState {
	for i := range st.disks {
		if st.disks[i].key == key {
			return &st.disks[i]
		}
	}
	return nil
}

func (st *vmState) snapshotDir(snap types.ManagedObjectReference) string {
	return filepath.Join(st.dir, "snapshots", snap.Value)
}

func (st *vmState) snapshotImage(snap types.ManagedObjectReference, key int32) string {
	return filepath.Join(st.snapshotDir(snap), fmt.Sprintf("%d.img", key))
}

// epochDir is the directory name of an epoch: its hex digits only.
func epochDir(epoch string) string {
	return strings.NewReplacer(" ", "", "-", "").Replace(epoch)
}

func (st *vmState) checkpoint(key int32, epoch string, n int) string {
	return filepath.Join(st.dir, "changes", strconv.Itoa(int(key)), epochDir(epoch), fmt.Sprintf("%d.img", n))
}

// VM is a simulator VirtualMachine with CBT and real snapshot images.
// The library's object is embedded by value: the PropertyCollector digs
// the mo type out of wrappers through leading struct fields, not pointers.
type VM struct {
	simulator.VirtualMachine
	st *vmState
}

// Snap is a simulator VirtualMachineSnapshot whose removal is handled here.
type Snap struct {
	simulator.VirtualMachineSnapshot
	vm *VM
}

func (vm *VM) cbtEnabled() bool {
	return vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
}

// runTask runs fn as a task on entity, with a readable localized message
// on failure (the library's is the Go type name of the fault).
func runTask(entity types.ManagedObjectReference, name string,
	fn func() (types.AnyType, types.BaseMethodFault, string)) types.ManagedObjectReference {
	var msg string
	task := simulator.CreateTask(entity, name, func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		res, fault, m := fn()
		msg = m
		return res, fault
	})
	ref := task.Run()
	if task.Info.Error != nil && msg != "" {
		simulator.Map.Update(task, []types.PropertyChange{{
			Name: "info.error",
			Val:  types.LocalizedMethodFault{Fault: task.Info.Error.Fault, LocalizedMessage: msg},
		}})
	}
	return ref
}

func diskBacking(d *types.VirtualDisk) *string {
	switch b := d.Backing.(type) {
	case *types.VirtualDiskFlatVer2BackingInfo:
		return &b.ChangeId
	case *types.VirtualDiskRawDiskMappingVer1BackingInfo:
		return &b.ChangeId
	case *types.VirtualDiskSparseVer2BackingInfo:
		return &b.ChangeId
	}
	return nil
}

// setLiveChangeIds sets (or clears, with "") every live disk's changeId.
func (vm *VM) setLiveChangeIds(ids map[int32]string) {
	devices := vm.Config.Hardware.Device
	for _, dev := range devices {
		if d, ok := dev.(*types.VirtualDisk); ok {
			if p := diskBacking(d); p != nil {
				*p = ids[d.Key]
			}
		}
	}
	simulator.Map.Update(&vm.VirtualMachine, []types.PropertyChange{
		{Name: "config.hardware.device", Val: devices},
	})
}

// ReconfigVMTask lets the library reconfigure, then follows CBT on/off:
// turning it off ends the tracking epoch, turning it on starts a new one
// (disks get change ids only at the next snapshot).
func (vm *VM) ReconfigVMTask(ctx *simulator.Context, req *types.ReconfigVM_Task) soap.HasFault {
	was := vm.cbtEnabled()
	// The library asserts flat backings when it lays out disks.
	rdm := swapBackings(&vm.VirtualMachine, nil)
	res := vm.VirtualMachine.ReconfigVMTask(ctx, req)
	swapBackings(&vm.VirtualMachine, rdm)
	now := vm.cbtEnabled()
	if was && !now {
		vm.st.epoch = ""
		vm.st.counters = map[int32]int{}
		vm.setLiveChangeIds(nil)
	} else if !was && now {
		vm.st.epoch = newEpoch()
		vm.st.counters = map[int32]int{}
	}
	return res
}

// copyDisk copies a snapshot's view of a disk device so later changes to
// the live device do not show through.
func copyDisk(d *types.VirtualDisk) *types.VirtualDisk {
	c := *d
	switch b := d.Backing.(type) {
	case *types.VirtualDiskFlatVer2BackingInfo:
		nb := *b
		c.Backing = &nb
	case *types.VirtualDiskRawDiskMappingVer1BackingInfo:
		nb := *b
		c.Backing = &nb
	case *types.VirtualDiskSparseVer2BackingInfo:
		nb := *b
		c.Backing = &nb
	}
	return &c
}

// ShutdownGuest as the spec says the guest answers: Tools not running (a
// fault, as vCenter answers), ignored (the VM stays on), or the simulator's
// own (off at once).
func (vm *VM) ShutdownGuest(ctx *simulator.Context, req *types.ShutdownGuest) soap.HasFault {
	switch vm.st.shutdown {
	case "no_tools":
		return &methods.ShutdownGuestBody{Fault_: simulator.Fault("VMware Tools is not running in the guest",
			&types.ToolsUnavailable{})}
	case "ignored":
		return &methods.ShutdownGuestBody{Res: &types.ShutdownGuestResponse{}}
	}
	return vm.VirtualMachine.ShutdownGuest(ctx, req)
}

// CreateSnapshotTask adds the snapshot to the tree, copies every live disk
// image, and with CBT on gives every disk a new change id whose checkpoint
// is that copy.
func (vm *VM) CreateSnapshotTask(req *types.CreateSnapshot_Task) soap.HasFault {
	ref := runTask(vm.Self, "createSnapshot", func() (types.AnyType, types.BaseMethodFault, string) {
		st := vm.st
		if st.failSnapshot {
			return nil, &types.SnapshotFault{}, fmt.Sprintf("An error occurred while taking a snapshot: injected failure for %s", vm.Name)
		}
		// A quiesced snapshot needs VMware Tools running in the guest; both
		// refusals are vCenter's own fault and text.
		if req.Quiesce && vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn {
			if vm.Guest.ToolsRunningStatus != string(types.VirtualMachineToolsRunningStatusGuestToolsRunning) {
				return nil, &types.ApplicationQuiesceFault{}, "Cannot quiesce this virtual machine because VMware Tools is not currently available."
			}
			if st.failQuiesce {
				return nil, &types.ApplicationQuiesceFault{}, "An error occurred while quiescing the virtual machine. The guest OS has reported an error during quiescing."
			}
		}
		inner := &simulator.VirtualMachineSnapshot{}
		inner.Vm = vm.Self
		simulator.Map.Put(inner) // assigns the moref
		snapRef := inner.Self
		dir := st.snapshotDir(snapRef)
		fail := func(err error) (types.AnyType, types.BaseMethodFault, string) {
			_ = os.RemoveAll(dir)
			simulator.Map.Remove(snapRef)
			return nil, &types.FileFault{File: dir}, fmt.Sprintf("An error occurred while saving the snapshot: %v", err)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fail(err)
		}
		for _, d := range st.disks {
			if err := sparseCopy(d.live, st.snapshotImage(snapRef, d.key)); err != nil {
				return fail(err)
			}
		}
		ids := map[int32]string{}
		if vm.cbtEnabled() && st.epoch != "" {
			for _, d := range st.disks {
				n := st.counters[d.key] + 1
				cp := st.checkpoint(d.key, st.epoch, n)
				if err := os.MkdirAll(filepath.Dir(cp), 0o755); err != nil {
					return fail(err)
				}
				if err := os.Link(st.snapshotImage(snapRef, d.key), cp); err != nil {
					if err := sparseCopy(st.snapshotImage(snapRef, d.key), cp); err != nil {
						return fail(err)
					}
				}
				st.counters[d.key] = n
				ids[d.key] = fmt.Sprintf("%s/%d", st.epoch, n)
			}
			vm.setLiveChangeIds(ids)
		}

		// The snapshot's config: the VM's, with its own copies of the disks.
		cfg := *vm.Config
		devices := make([]types.BaseVirtualDevice, len(cfg.Hardware.Device))
		for i, dev := range cfg.Hardware.Device {
			if d, ok := dev.(*types.VirtualDisk); ok {
				devices[i] = copyDisk(d)
			} else {
				devices[i] = dev
			}
		}
		cfg.Hardware.Device = devices
		snap := &Snap{VirtualMachineSnapshot: *inner, vm: vm}
		snap.Config = cfg
		simulator.Map.Put(snap)

		st.snapSeq++
		item := types.VirtualMachineSnapshotTree{
			Snapshot:        snapRef,
			Vm:              vm.Self,
			Name:            req.Name,
			Description:     req.Description,
			Id:              st.snapSeq,
			CreateTime:      time.Now(),
			State:           vm.Runtime.PowerState,
			Quiesced:        req.Quiesce,
			ReplaySupported: types.NewBool(false),
		}
		info := &types.VirtualMachineSnapshotInfo{}
		if vm.Snapshot != nil {
			info.RootSnapshotList = vm.Snapshot.RootSnapshotList
			if cur := vm.Snapshot.CurrentSnapshot; cur != nil {
				if parent, ok := simulator.Map.Get(*cur).(*Snap); ok {
					parent.ChildSnapshot = append(parent.ChildSnapshot, snapRef)
				}
				if node := findInTree(info.RootSnapshotList, *cur); node != nil {
					node.ChildSnapshotList = append(node.ChildSnapshotList, item)
				}
			} else {
				info.RootSnapshotList = append(info.RootSnapshotList, item)
			}
		} else {
			info.RootSnapshotList = []types.VirtualMachineSnapshotTree{item}
		}
		info.CurrentSnapshot = &snapRef
		simulator.Map.Update(&vm.VirtualMachine, []types.PropertyChange{{Name: "snapshot", Val: info}})
		return snapRef, nil, ""
	})
	return &methods.CreateSnapshot_TaskBody{Res: &types.CreateSnapshot_TaskResponse{Returnval: ref}}
}

func findInTree(tree []types.VirtualMachineSnapshotTree, ref types.ManagedObjectReference) *types.VirtualMachineSnapshotTree {
	for i := range tree {
		if tree[i].Snapshot == ref {
			return &tree[i]
		}
		if n := findInTree(tree[i].ChildSnapshotList, ref); n != nil {
			return n
		}
	}
	return nil
}

func findParent(tree []types.VirtualMachineSnapshotTree, parent *types.ManagedObjectReference,
	ref types.ManagedObjectReference) (*types.ManagedObjectReference, bool) {
	for i := range tree {
		if tree[i].Snapshot == ref {
			return parent, true
		}
		if p, ok := findParent(tree[i].ChildSnapshotList, &tree[i].Snapshot, ref); ok {
			return p, true
		}
	}
	return nil, false
}

func subtree(node types.VirtualMachineSnapshotTree) []types.ManagedObjectReference {
	refs := []types.ManagedObjectReference{node.Snapshot}
	for _, c := range node.ChildSnapshotList {
		refs = append(refs, subtree(c)...)
	}
	return refs
}

// removeFromTree removes ref; its children move up unless removeChildren.
func removeFromTree(tree []types.VirtualMachineSnapshotTree, ref types.ManagedObjectReference,
	removeChildren bool) []types.VirtualMachineSnapshotTree {
	var out []types.VirtualMachineSnapshotTree
	for _, n := range tree {
		if n.Snapshot == ref {
			if !removeChildren {
				out = append(out, n.ChildSnapshotList...)
			}
			continue
		}
		n.ChildSnapshotList = removeFromTree(n.ChildSnapshotList, ref, removeChildren)
		out = append(out, n)
	}
	return out
}

// removeSnapshots drops snapshots from the tree and deletes their images;
// the CBT checkpoints stay.
func (vm *VM) removeSnapshot(ref types.ManagedObjectReference, removeChildren bool) {
	if vm.Snapshot == nil {
		return
	}
	node := findInTree(vm.Snapshot.RootSnapshotList, ref)
	if node == nil {
		return
	}
	removed := []types.ManagedObjectReference{ref}
	var promoted []types.ManagedObjectReference
	for _, c := range node.ChildSnapshotList {
		if removeChildren {
			removed = append(removed, subtree(c)...)
		} else {
			promoted = append(promoted, c.Snapshot)
		}
	}
	parent, _ := findParent(vm.Snapshot.RootSnapshotList, nil, ref)
	if parent != nil {
		if p, ok := simulator.Map.Get(*parent).(*Snap); ok {
			var kids []types.ManagedObjectReference
			for _, k := range p.ChildSnapshot {
				if k != ref {
					kids = append(kids, k)
				}
			}
			p.ChildSnapshot = append(kids, promoted...)
		}
	}
	tree := removeFromTree(vm.Snapshot.RootSnapshotList, ref, removeChildren)
	cur := vm.Snapshot.CurrentSnapshot
	if cur != nil {
		for _, r := range removed {
			if *cur == r {
				cur = parent
				break
			}
		}
	}
	for _, r := range removed {
		_ = os.RemoveAll(vm.st.snapshotDir(r))
		simulator.Map.Remove(r)
	}
	if len(tree) == 0 {
		simulator.Map.Update(&vm.VirtualMachine, []types.PropertyChange{{Name: "snapshot", Val: nil}})
		vm.Snapshot = nil
		return
	}
	info := &types.VirtualMachineSnapshotInfo{RootSnapshotList: tree, CurrentSnapshot: cur}
	simulator.Map.Update(&vm.VirtualMachine, []types.PropertyChange{{Name: "snapshot", Val: info}})
}

// RemoveSnapshotTask removes the snapshot (the task's entity is the VM, as
// on a real vCenter).
func (s *Snap) RemoveSnapshotTask(ctx *simulator.Context, req *types.RemoveSnapshot_Task) soap.HasFault {
	vm := s.vm
	ref := runTask(vm.Self, "removeSnapshot", func() (types.AnyType, types.BaseMethodFault, string) {
		simulator.Map.WithLock(vm, func() {
			vm.removeSnapshot(s.Self, req.RemoveChildren)
		})
		return nil, nil, ""
	})
	return &methods.RemoveSnapshot_TaskBody{Res: &types.RemoveSnapshot_TaskResponse{Returnval: ref}}
}

// RevertToSnapshotTask makes the snapshot current and copies its images
// back over the live disks.
func (s *Snap) RevertToSnapshotTask(ctx *simulator.Context, req *types.RevertToSnapshot_Task) soap.HasFault {
	vm := s.vm
	ref := runTask(vm.Self, "revertToSnapshot", func() (types.AnyType, types.BaseMethodFault, string) {
		var fault types.BaseMethodFault
		var msg string
		simulator.Map.WithLock(vm, func() {
			for _, d := range vm.st.disks {
				if err := sparseCopy(vm.st.snapshotImage(s.Self, d.key), d.live); err != nil {
					fault, msg = &types.FileFault{File: d.live}, err.Error()
					return
				}
			}
			info := *vm.Snapshot
			self := s.Self
			info.CurrentSnapshot = &self
			simulator.Map.Update(&vm.VirtualMachine, []types.PropertyChange{{Name: "snapshot", Val: &info}})
		})
		return nil, fault, msg
	})
	return &methods.RevertToSnapshot_TaskBody{Res: &types.RevertToSnapshot_TaskResponse{Returnval: ref}}
}

// RemoveAllSnapshotsTask removes every snapshot of the VM.
func (vm *VM) RemoveAllSnapshotsTask(ctx *simulator.Context, req *types.RemoveAllSnapshots_Task) soap.HasFault {
	ref := runTask(vm.Self, "removeAllSnapshots", func() (types.AnyType, types.BaseMethodFault, string) {
		for vm.Snapshot != nil && len(vm.Snapshot.RootSnapshotList) > 0 {
			vm.removeSnapshot(vm.Snapshot.RootSnapshotList[0].Snapshot, true)
		}
		return nil, nil, ""
	})
	return &methods.RemoveAllSnapshots_TaskBody{Res: &types.RemoveAllSnapshots_TaskResponse{Returnval: ref}}
}

// QueryChangedDiskAreas answers from the snapshot's image: "*" gives its
// allocated areas, "<epoch>/<n>" the 64 KiB blocks that differ from
// checkpoint n. Each call covers at most cbtPageBytes from startOffset.
func (vm *VM) QueryChangedDiskAreas(ctx *simulator.Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	body := &methods.QueryChangedDiskAreasBody{}
	info, fault := vm.changedAreas(req)
	if fault != nil {
		body.Fault_ = fault
		return body
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *info}
	return body
}

func invalidArg(prop, msg string) *soap.Fault {
	return simulator.Fault(msg, &types.InvalidArgument{InvalidProperty: prop})
}

func (vm *VM) changedAreas(req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, *soap.Fault) {
	st := vm.st
	if !vm.cbtEnabled() || st.epoch == "" {
		return nil, simulator.Fault(fmt.Sprintf("Changed block tracking is not enabled on %s", vm.Name),
			&types.FileFault{File: vm.Config.Files.VmPathName})
	}
	if req.Snapshot == nil {
		return nil, invalidArg("snapshot", "a snapshot is required")
	}
	snap, ok := simulator.Map.Get(*req.Snapshot).(*Snap)
	if !ok || snap.vm != vm {
		return nil, invalidArg("snapshot", fmt.Sprintf("snapshot %s not found on %s", req.Snapshot.Value, vm.Self.Value))
	}
	disk := st.disk(req.DeviceKey)
	if disk == nil {
		return nil, invalidArg("deviceKey", fmt.Sprintf("no disk with device key %d", req.DeviceKey))
	}
	var snapChangeID string
	for _, dev := range snap.Config.Hardware.Device {
		if d, ok := dev.(*types.VirtualDisk); ok && d.Key == req.DeviceKey {
			if p := diskBacking(d); p != nil {
				snapChangeID = *p
			}
		}
	}
	if req.StartOffset < 0 || req.StartOffset > disk.capacity {
		return nil, invalidArg("startOffset", fmt.Sprintf("startOffset %d outside the disk (capacity %d)", req.StartOffset, disk.capacity))
	}
	end := req.StartOffset + cbtPageBytes
	if end > disk.capacity {
		end = disk.capacity
	}
	info := &types.DiskChangeInfo{StartOffset: req.StartOffset, Length: end - req.StartOffset}
	if end == req.StartOffset {
		return info, nil
	}
	image := st.snapshotImage(snap.Self, disk.key)
	from := req.StartOffset / blockSize * blockSize

	var areas []extent
	if req.ChangeId == "*" {
		exts, err := dataExtents(image, from, end)
		if err != nil {
			return nil, simulator.Fault(err.Error(), &types.FileFault{File: image})
		}
		areas = alignExtents(exts, end)
	} else {
		slash := strings.LastIndex(req.ChangeId, "/")
		if slash <= 0 {
			return nil, invalidArg("changeId", fmt.Sprintf("malformed changeId %q", req.ChangeId))
		}
		epoch := req.ChangeId[:slash]
		n, err := strconv.Atoi(req.ChangeId[slash+1:])
		if err != nil || n <= 0 {
			return nil, invalidArg("changeId", fmt.Sprintf("malformed changeId %q", req.ChangeId))
		}
		if epoch != st.epoch {
			return nil, simulator.Fault(fmt.Sprintf("changeId %q is from another tracking epoch (tracking was reset)", req.ChangeId),
				&types.FileFault{File: image})
		}
		if snapChangeID == "" {
			return nil, simulator.Fault(fmt.Sprintf("snapshot %s was taken without change tracking", snap.Self.Value),
				&types.FileFault{File: image})
		}
		cp := st.checkpoint(disk.key, epoch, n)
		if _, err := os.Stat(cp); err != nil {
			return nil, simulator.Fault(fmt.Sprintf("unknown changeId %q for disk %d", req.ChangeId, disk.key),
				&types.FileFault{File: image})
		}
		areas, err = diffBlocks(cp, image, from, end)
		if err != nil {
			return nil, simulator.Fault(err.Error(), &types.FileFault{File: image})
		}
	}
	for _, a := range areas {
		s, e := a.start, a.start+a.length
		if s < req.StartOffset {
			s = req.StartOffset
		}
		if e > s {
			info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: s, Length: e - s})
		}
	}
	return info, nil
}

// swapBackings puts the given RDM backings on their disks, or with nil
// replaces every RDM backing by an equivalent flat one and returns the RDM
// ones (the library's disk layout code only knows flat backings).
func swapBackings(vm *simulator.VirtualMachine, rdm map[int32]*types.VirtualDiskRawDiskMappingVer1BackingInfo) map[int32]*types.VirtualDiskRawDiskMappingVer1BackingInfo {
	taken := map[int32]*types.VirtualDiskRawDiskMappingVer1BackingInfo{}
	for _, dev := range vm.Config.Hardware.Device {
		d, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		if rdm != nil {
			if b, ok := rdm[d.Key]; ok {
				if flat, ok := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
					b.Datastore = flat.Datastore
					b.ChangeId = flat.ChangeId
				}
				d.Backing = b
			}
			continue
		}
		if b, ok := d.Backing.(*types.VirtualDiskRawDiskMappingVer1BackingInfo); ok {
			taken[d.Key] = b
			d.Backing = &types.VirtualDiskFlatVer2BackingInfo{
				VirtualDeviceFileBackingInfo: b.VirtualDeviceFileBackingInfo,
				DiskMode:                     b.DiskMode,
				Uuid:                         b.Uuid,
				ChangeId:                     b.ChangeId,
				Sharing:                      b.Sharing,
			}
		}
	}
	return taken
}
