package main

// pyvmomi reads a managed object's attribute (vm.snapshot, vm.config, ...)
// with the PropertyCollector's Fetch method. The library's Fetch indexes an
// empty result when the property is unset (vm.snapshot of a VM without
// snapshots) and panics; this wrapper answers such reads with an empty
// value instead, as a real vCenter does.

import (
	"reflect"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// PC wraps the PropertyCollector; the simulator makes one per session by
// allocating a zero value of the registered type.
type PC struct {
	simulator.PropertyCollector
}

type fetchResponse struct {
	Returnval types.AnyType `xml:"returnval,omitempty,typeattr"`
}

type fetchBody struct {
	Res    *fetchResponse `xml:"FetchResponse,omitempty"`
	Fault_ *soap.Fault    `xml:"http://schemas.xmlsoap.org/soap/envelope/ Fault,omitempty"`
}

func (b *fetchBody) Fault() *soap.Fault { return b.Fault_ }

// Fetch takes the request as interface{}: its type lives in the library's
// internal package.
func (pc *PC) Fetch(ctx *simulator.Context, req interface{}) (res soap.HasFault) {
	defer func() {
		if r := recover(); r != nil {
			// Only the unset-property case panics: answer "unset".
			res = &fetchBody{Res: &fetchResponse{}}
		}
	}()
	m := reflect.ValueOf(&pc.PropertyCollector).MethodByName("Fetch")
	out := m.Call([]reflect.Value{reflect.ValueOf(ctx), reflect.ValueOf(req)})
	return out[0].Interface().(soap.HasFault)
}

func wrapPropertyCollector() {
	// Sessions get fresh zero-valued collectors of this type, so the
	// registered one need not carry the original's state either.
	pc := &PC{}
	pc.Self = types.ManagedObjectReference{Type: "PropertyCollector", Value: "propertyCollector"}
	simulator.Map.Put(pc)
}
