// Command vcsim is the project's test vCenter: govmomi's simulator library
// (Debian's 0.24.2) plus changed block tracking backed by real disk images.
//
// Usage: vcsim --listen 127.0.0.1:0 --data DIR --spec SPEC.json
//
//	--username USER --password-file FILE [--cbt-page-bytes N]
//
// Prints one JSON line describing the server and its VMs once listening and
// runs until SIGTERM/SIGINT.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/types"
)

type nicSpec struct {
	Network string `json:"network"`
	MAC     string `json:"mac"`
	// IPs are the addresses VMware Tools reports the guest has on the NIC
	// (guest.net[].ipAddress; shown only while Tools runs, as on vCenter).
	IPs []string `json:"ips"`
}

type diskSpec struct {
	CapacityBytes int64  `json:"capacity_bytes"`
	Mode          string `json:"mode"`
	RDM           bool   `json:"rdm"`
	Sharing       string `json:"sharing"`
}

type vmSpec struct {
	Name       string     `json:"name"`
	CBT        bool       `json:"cbt"`
	Firmware   string     `json:"firmware"`
	GuestID    string     `json:"guest_id"`
	CPUs       int32      `json:"cpus"`
	MemoryMB   int64      `json:"memory_mib"`
	PowerState string     `json:"power_state"`
	NICs       []nicSpec  `json:"nics"`
	Disks      []diskSpec `json:"disks"`
	// FailSnapshot makes CreateSnapshot_Task fail for this VM (fault injection).
	FailSnapshot bool `json:"fail_snapshot"`
	// GuestShutdown: "" (the guest shuts down when asked), "no_tools" (VMware
	// Tools not running: ShutdownGuest fails) or "ignored" (the guest stays on).
	GuestShutdown string `json:"guest_shutdown"`
	// DeniedPrivileges are reported as not granted on this VM (preflight tests).
	DeniedPrivileges []string `json:"denied_privileges"`
	// Tools: "" (the library's: VMware Tools not installed), "running" or
	// "not_running" (installed, stopped). A reconfigure with extraConfig
	// SET.guest.toolsRunningStatus changes it later, as with govc.
	Tools string `json:"tools"`
	// FailQuiesce makes a quiesced CreateSnapshot_Task fail as a guest
	// whose quiescing fails does (fault injection).
	FailQuiesce bool `json:"fail_quiesce"`
}

type simSpec struct {
	VMs []vmSpec `json:"vms"`
}

type vmOut struct {
	Moref string            `json:"moref"`
	UUID  string            `json:"uuid"`
	Disks map[string]string `json:"disks"`
}

type ready struct {
	URL        string           `json:"url"`
	Host       string           `json:"host"`
	Port       int              `json:"port"`
	Thumbprint string           `json:"thumbprint"`
	VMs        map[string]vmOut `json:"vms"`
}

// config shared by the extensions
var (
	dataDir       string
	cbtPageBytes  int64
	vmStates      = map[string]*vmState{} // by VM moref value
	datastoreName = "LocalDS_0"
)

func fatalf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "vcsim: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	data := flag.String("data", "", "data directory for disk images")
	specPath := flag.String("spec", "", "JSON spec of the VMs")
	username := flag.String("username", "administrator@vsphere.local", "the only user")
	passwordFile := flag.String("password-file", "", "file holding the password")
	flag.Int64Var(&cbtPageBytes, "cbt-page-bytes", 256<<20, "max span covered by one QueryChangedDiskAreas")
	flag.Parse()

	if *data == "" || *specPath == "" || *passwordFile == "" {
		fatalf("--data, --spec and --password-file are required")
	}
	if cbtPageBytes < blockSize || cbtPageBytes%blockSize != 0 {
		fatalf("--cbt-page-bytes must be a positive multiple of %d", blockSize)
	}
	var err error
	dataDir, err = filepath.Abs(*data)
	if err != nil {
		fatalf("%v", err)
	}
	raw, err := os.ReadFile(*specPath)
	if err != nil {
		fatalf("reading spec: %v", err)
	}
	var spec simSpec
	if err := json.Unmarshal(raw, &spec); err != nil {
		fatalf("parsing spec: %v", err)
	}
	pw, err := os.ReadFile(*passwordFile)
	if err != nil {
		fatalf("reading password file: %v", err)
	}
	password := strings.TrimRight(string(pw), "\r\n")
	if password == "" {
		fatalf("empty password")
	}

	log.SetOutput(os.Stderr)

	model := simulator.VPX()
	model.Machine = 0 // only the spec's VMs
	model.Autostart = false
	if err := model.Create(); err != nil {
		fatalf("creating model: %v", err)
	}
	defer model.Remove()

	out := ready{VMs: map[string]vmOut{}}
	if err := createVMs(model, spec, out.VMs); err != nil {
		fatalf("creating VMs: %v", err)
	}

	wrapPropertyCollector()

	cert, der, err := selfSignedCert()
	if err != nil {
		fatalf("certificate: %v", err)
	}
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*username, password)}
	server := model.Service.NewServer()
	defer server.Close()

	addr := server.Listener.Addr().(*net.TCPAddr)
	out.Host = addr.IP.String()
	out.Port = addr.Port
	out.URL = "https://" + net.JoinHostPort(out.Host, strconv.Itoa(out.Port)) + "/sdk"
	sum := sha1.Sum(der)
	hexes := make([]string, len(sum))
	for i, b := range sum {
		hexes[i] = fmt.Sprintf("%02X", b)
	}
	out.Thumbprint = strings.Join(hexes, ":")

	line, _ := json.Marshal(out)
	fmt.Println(string(line))

	done := make(chan os.Signal, 1)
	signal.Notify(done, syscall.SIGTERM, syscall.SIGINT)
	<-done
}

func selfSignedCert() (tls.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "127.0.0.1", Organization: []string{"vcsim test"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour * 30),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, &tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, der, nil
}

func createVMs(model *simulator.Model, spec simSpec, out map[string]vmOut) error {
	ctx := context.Background()
	c, err := vim25.NewClient(ctx, model.Service)
	if err != nil {
		return err
	}
	finder := find.NewFinder(c, false)
	dc, err := finder.DefaultDatacenter(ctx)
	if err != nil {
		return err
	}
	finder.SetDatacenter(dc)
	folders, err := dc.Folders(ctx)
	if err != nil {
		return err
	}
	host, err := finder.HostSystem(ctx, "DC0_H0")
	if err != nil {
		return err
	}
	pool, err := host.ResourcePool(ctx)
	if err != nil {
		return err
	}
	installAuthorizationManager(c)
	seen := map[string]bool{}
	for _, vs := range spec.VMs {
		if vs.Name == "" || seen[vs.Name] {
			return fmt.Errorf("VM names must be unique and non-empty: %q", vs.Name)
		}
		seen[vs.Name] = true
		if err := createVM(ctx, c, folders, pool, host, vs, out); err != nil {
			return fmt.Errorf("%s: %w", vs.Name, err)
		}
	}
	return nil
}

func createVM(ctx context.Context, c *vim25.Client, folders *object.DatacenterFolders, pool *object.ResourcePool,
	host *object.HostSystem, vs vmSpec, out map[string]vmOut) error {
	guest := vs.GuestID
	if guest == "" {
		guest = "otherLinux64Guest"
	}
	firmware := vs.Firmware
	if firmware == "" {
		firmware = "bios"
	}
	cpus, memory := vs.CPUs, vs.MemoryMB
	if cpus == 0 {
		cpus = 1
	}
	if memory == 0 {
		memory = 256
	}
	config := types.VirtualMachineConfigSpec{
		Name:                  vs.Name,
		GuestId:               guest,
		Firmware:              firmware,
		NumCPUs:               cpus,
		MemoryMB:              memory,
		Files:                 &types.VirtualMachineFileInfo{VmPathName: "[" + datastoreName + "]"},
		ChangeTrackingEnabled: types.NewBool(vs.CBT),
	}
	var changes []types.BaseVirtualDeviceConfigSpec
	scsi := &types.ParaVirtualSCSIController{VirtualSCSIController: types.VirtualSCSIController{
		SharedBus:          types.VirtualSCSISharingNoSharing,
		ScsiCtlrUnitNumber: 7,
		VirtualController: types.VirtualController{
			BusNumber:     0,
			VirtualDevice: types.VirtualDevice{Key: 1000},
		},
	}}
	changes = append(changes, &types.VirtualDeviceConfigSpec{
		Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: scsi,
	})
	unit := int32(0)
	rdm := map[int32]*types.VirtualDiskRawDiskMappingVer1BackingInfo{}
	for i, ds := range vs.Disks {
		if unit == 7 {
			unit++
		}
		if ds.CapacityBytes <= 0 {
			return fmt.Errorf("disk %d: capacity_bytes must be positive", i)
		}
		fileName := fmt.Sprintf("[%s] %s/%s.vmdk", datastoreName, vs.Name, vs.Name)
		if i > 0 {
			fileName = fmt.Sprintf("[%s] %s/%s_%d.vmdk", datastoreName, vs.Name, vs.Name, i)
		}
		mode := ds.Mode
		if mode == "" {
			mode = "persistent"
		}
		// The library only handles flat backings; RDM ones are swapped in
		// after creation (see rdmBackings).
		backing := &types.VirtualDiskFlatVer2BackingInfo{
			VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: fileName},
			DiskMode:                     mode,
			ThinProvisioned:              types.NewBool(true),
			Uuid:                         newUUID(),
			Sharing:                      ds.Sharing,
		}
		if ds.RDM {
			rdm[int32(2000+i)] = &types.VirtualDiskRawDiskMappingVer1BackingInfo{
				VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: fileName},
				CompatibilityMode:            "virtualMode",
				DiskMode:                     mode,
				DeviceName:                   fmt.Sprintf("/vmfs/devices/disks/naa.6000c29%023d", 2000+i),
				LunUuid:                      fmt.Sprintf("0200000000600c29%016d", 2000+i),
				Uuid:                         backing.Uuid,
				Sharing:                      ds.Sharing,
			}
		}
		u := unit
		disk := &types.VirtualDisk{
			VirtualDevice: types.VirtualDevice{
				Key:           int32(2000 + i),
				ControllerKey: 1000,
				UnitNumber:    &u,
				Backing:       backing,
			},
			CapacityInKB:    ds.CapacityBytes / 1024,
			CapacityInBytes: ds.CapacityBytes,
		}
		changes = append(changes, &types.VirtualDeviceConfigSpec{
			Operation:     types.VirtualDeviceConfigSpecOperationAdd,
			FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate,
			Device:        disk,
		})
		unit++
	}
	for i, ns := range vs.NICs {
		netName := ns.Network
		if netName == "" {
			netName = "VM Network"
		}
		netObj, err := find.NewFinder(c, false).Network(ctx, "/DC0/network/"+netName)
		if err != nil {
			return fmt.Errorf("nic %d: network %q: %w", i, netName, err)
		}
		netRef := netObj.Reference()
		card := types.VirtualEthernetCard{
			VirtualDevice: types.VirtualDevice{
				Key: int32(4000 + i),
				Backing: &types.VirtualEthernetCardNetworkBackingInfo{
					VirtualDeviceDeviceBackingInfo: types.VirtualDeviceDeviceBackingInfo{DeviceName: netName},
					Network:                        &netRef,
				},
			},
			AddressType: "manual",
			MacAddress:  ns.MAC,
		}
		if ns.MAC == "" {
			card.AddressType = "generated"
		}
		changes = append(changes, &types.VirtualDeviceConfigSpec{
			Operation: types.VirtualDeviceConfigSpecOperationAdd,
			Device:    &types.VirtualVmxnet3{VirtualVmxnet: types.VirtualVmxnet{VirtualEthernetCard: card}},
		})
	}
	config.DeviceChange = changes

	task, err := folders.VmFolder.CreateVM(ctx, config, pool, host)
	if err != nil {
		return err
	}
	info, err := task.WaitForResult(ctx, nil)
	if err != nil {
		return err
	}
	ref := info.Result.(types.ManagedObjectReference)
	if vs.PowerState == "" || vs.PowerState == "poweredOn" {
		vm := object.NewVirtualMachine(c, ref)
		t, err := vm.PowerOn(ctx)
		if err != nil {
			return err
		}
		if err := t.Wait(ctx); err != nil {
			return err
		}
	}

	inner := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	swapBackings(inner, rdm)
	if err := setGuest(inner, vs); err != nil {
		return err
	}
	st := &vmState{
		ref:          ref,
		dir:          filepath.Join(dataDir, "vms", ref.Value),
		failSnapshot: vs.FailSnapshot,
		failQuiesce:  vs.FailQuiesce,
		shutdown:     vs.GuestShutdown,
		denied:       map[string]bool{},
		counters:     map[int32]int{},
	}
	if vs.CBT {
		st.epoch = newEpoch()
	}
	for _, priv := range vs.DeniedPrivileges {
		st.denied[priv] = true
	}
	o := vmOut{Moref: ref.Value, UUID: inner.Config.Uuid, Disks: map[string]string{}}
	if err := os.MkdirAll(st.dir, 0o755); err != nil {
		return err
	}
	for i, ds := range vs.Disks {
		key := int32(2000 + i)
		p := filepath.Join(st.dir, fmt.Sprintf("%d.img", key))
		f, err := os.OpenFile(p, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		if err := f.Truncate(ds.CapacityBytes); err != nil {
			f.Close()
			return err
		}
		f.Close()
		st.disks = append(st.disks, diskState{key: key, capacity: ds.CapacityBytes, live: p})
		o.Disks[strconv.Itoa(int(key))] = p
	}
	vmStates[ref.Value] = st
	simulator.Map.Put(&VM{VirtualMachine: *inner, st: st})
	out[vs.Name] = o
	return nil
}

// setGuest sets what VMware Tools reports: its state and, while it runs,
// the guest's addresses per NIC.
func setGuest(vm *simulator.VirtualMachine, vs vmSpec) error {
	switch vs.Tools {
	case "":
		return nil
	case "running":
		vm.Guest.ToolsRunningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
		vm.Guest.ToolsStatus = types.VirtualMachineToolsStatusToolsOk
	case "not_running":
		vm.Guest.ToolsRunningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsNotRunning)
		vm.Guest.ToolsStatus = types.VirtualMachineToolsStatusToolsNotRunning
	default:
		return fmt.Errorf("tools must be \"\", \"running\" or \"not_running\", not %q", vs.Tools)
	}
	vm.Guest.ToolsVersionStatus2 = string(types.VirtualMachineToolsVersionStatusGuestToolsCurrent)
	vm.Summary.Guest.ToolsStatus = vm.Guest.ToolsStatus
	if vs.Tools != "running" {
		return nil
	}
	for i, ns := range vs.NICs {
		for j := range vm.Guest.Net {
			if vm.Guest.Net[j].DeviceConfigId == int32(4000+i) {
				vm.Guest.Net[j].IpAddress = ns.IPs
			}
		}
	}
	return nil
}

func newUUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// newEpoch returns a tracking epoch id in vSphere's look:
// "52 1f 3a ... 9c-4d 2e ... 11".
func newEpoch() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[0] = 0x52
	parts := make([]string, 16)
	for i, x := range b {
		parts[i] = fmt.Sprintf("%02x", x)
	}
	return strings.Join(parts[:8], " ") + "-" + strings.Join(parts[8:], " ")
}
