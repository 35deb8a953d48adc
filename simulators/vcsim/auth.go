package main

// Privilege checks that can say no: the library grants every privilege on
// everything, so a preflight's "missing privileges" could never be shown.

import (
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type AuthorizationManager struct {
	simulator.AuthorizationManager
}

func installAuthorizationManager(c *vim25.Client) {
	ref := *c.ServiceContent.AuthorizationManager
	inner := simulator.Map.Get(ref).(*simulator.AuthorizationManager)
	simulator.Map.Put(&AuthorizationManager{AuthorizationManager: *inner})
}

func granted(entity types.ManagedObjectReference, priv string) bool {
	st, ok := vmStates[entity.Value]
	return !ok || !st.denied[priv]
}

func (m *AuthorizationManager) HasPrivilegeOnEntity(req *types.HasPrivilegeOnEntity) soap.HasFault {
	res := make([]bool, len(req.PrivId))
	for i, id := range req.PrivId {
		res[i] = granted(req.Entity, id)
	}
	return &methods.HasPrivilegeOnEntityBody{Res: &types.HasPrivilegeOnEntityResponse{Returnval: res}}
}

func (m *AuthorizationManager) HasPrivilegeOnEntities(req *types.HasPrivilegeOnEntities) soap.HasFault {
	var res []types.EntityPrivilege
	for _, e := range req.Entity {
		priv := types.EntityPrivilege{Entity: e}
		for _, id := range req.PrivId {
			priv.PrivAvailability = append(priv.PrivAvailability,
				types.PrivilegeAvailability{PrivId: id, IsGranted: granted(e, id)})
		}
		res = append(res, priv)
	}
	return &methods.HasPrivilegeOnEntitiesBody{Res: &types.HasPrivilegeOnEntitiesResponse{Returnval: res}}
}
