; qblock test guest: a 512-byte boot sector for v86 (or any PC) that
;  1. reads sector 2 (LBA 1) through the BIOS (int 13h AH=02h) and checks
;     that byte i holds (i*7+3) mod 256, the pattern the tests put there;
;  2. reads sector 3 (LBA 2): if it starts with "WROTE", its next byte
;     counts the boots that wrote it before;
;  3. writes sector 3 back (int 13h AH=03h) as "WROTE" + (count+1);
;  4. prints "QBLOCK OK boot=N" (N = count+1) or "QBLOCK FAIL <step>" to
;     COM1 (0x3f8) and halts.
; So a second boot from the same disk prints boot=2 only if the first
; boot's write reached the image.
;
; Build: nasm -f bin -o boot.bin boot.asm

bits 16
org 0x7c00

start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    sti
    mov [drive], dl             ; the BIOS passes the boot drive in DL

    ; 1. read LBA 1 (cylinder 0, head 0, sector 2) to 0x8000
    mov bx, 0x8000
    mov cl, 2
    call read_sector
    jc fail_read
    mov si, 0x8000
    xor cx, cx
.check:
    mov al, cl
    mov bl, 7
    mul bl                      ; ax = (i mod 256) * 7
    add al, 3
    cmp al, [si]
    jne fail_pattern
    inc si
    inc cx
    cmp cx, 512
    jb .check

    ; 2. read LBA 2 (sector 3) to 0x8200 and find the boot count
    mov bx, 0x8200
    mov cl, 3
    call read_sector
    jc fail_read
    xor dl, dl                  ; count = 0 unless the sector carries our mark
    mov si, 0x8200
    mov di, mark
    mov cx, 5
    repe cmpsb
    jne .fresh
    mov dl, [0x8205]
.fresh:
    inc dl
    mov [count], dl

    ; 3. write "WROTE" + count to sector 3
    mov di, 0x8200
    mov si, mark
    mov cx, 5
    rep movsb
    mov al, [count]
    stosb
    mov bx, 0x8200
    mov cl, 3
    mov ah, 0x03
    call disk_op
    jc fail_write

    ; 4. report
    mov si, msg_ok
    call print
    mov al, [count]
    add al, '0'
    call putc
    mov si, crlf
    call print
    jmp halt

fail_read:
    mov si, msg_fail_read
    jmp fail
fail_pattern:
    mov si, msg_fail_pattern
    jmp fail
fail_write:
    mov si, msg_fail_write
fail:
    call print
halt:
    cli
    hlt
    jmp halt

; read one sector: CL = sector number (cylinder 0, head 0), ES:BX = buffer
read_sector:
    mov ah, 0x02
; AH = 02h read / 03h write, one sector, CL = sector, ES:BX = buffer; CF on error
disk_op:
    mov al, 1
    xor ch, ch
    xor dh, dh
    mov dl, [drive]
    int 0x13
    ret

; print the NUL-terminated string at DS:SI to COM1
print:
    lodsb
    test al, al
    jz .done
    call putc
    jmp print
.done:
    ret

; send AL to COM1, waiting for the transmit holding register to be empty
putc:
    push dx
    push ax
    mov dx, 0x3fd
.wait:
    in al, dx
    test al, 0x20
    jz .wait
    pop ax
    mov dx, 0x3f8
    out dx, al
    pop dx
    ret

drive:            db 0
count:            db 0
mark:             db "WROTE"
msg_ok:           db "QBLOCK OK boot=", 0
msg_fail_read:    db "QBLOCK FAIL read", 13, 10, 0
msg_fail_pattern: db "QBLOCK FAIL pattern", 13, 10, 0
msg_fail_write:   db "QBLOCK FAIL write", 13, 10, 0
crlf:             db 13, 10, 0

times 510 - ($ - $$) db 0
dw 0xaa55
